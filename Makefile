# ipvs-operator: `make demo` runs it end to end, `make test` runs every test.
# Both install what they need first (`make setup`, idempotent).

CARGO ?= cargo
RUSTUP ?= rustup
# Debian packages the tests and the demo need: qemu and the pieces of the VM's
# initramfs (busybox, ipvsadm, iproute2, kmod for depmod), cpio to pack it.
APT_PACKAGES := qemu-system-x86 busybox-static ipvsadm iproute2 kmod cpio
RUST_TARGETS := wasm32-wasip2 x86_64-unknown-linux-musl

.PHONY: all setup build test test-unit test-demo demo bench clean-vm crd image

all: build

## setup: install the Rust targets and Debian packages (idempotent).
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

build: setup
	$(CARGO) build --release --workspace

## test: every test — unit, policy, CLI, the kernel tests in the VM, and the demo
## (shorter: 2,000 connections), which fails when its measured split is off.
test: setup test-unit test-kernel test-demo

test-demo:
	$(MAKE) --no-print-directory demo DEMO_CONNECTIONS=2000

## test-unit: the tests that run on this machine without a VM.
test-unit:
	$(CARGO) test --release --workspace

## demo: the real thing end to end, in the VM: the test API server, the
## kube-proxy emulator, the controller and agent, pods as backends and a client,
## on the original project's example (or DEMO="a.yaml b.yaml": Deployments or
## Pods, and WeightedServices). Prints the desired and
## measured split, ipvsadm -Ln and `get weightedservices`; writes
## target/demo/result.json. DEMO_CONNECTIONS sets connections per WeightedService.
DEMO ?= examples/original-example.yaml
DEMO_CONNECTIONS ?= 5000
demo: setup vm-binaries
	@for f in $(DEMO); do test -f "$$f" || { echo "make demo: DEMO: $$f: no such file" >&2; exit 1; }; done
	rm -rf target/demo
	IPVS_VM_TIMEOUT=1200 $(VM_RUN) $(foreach f,$(DEMO),--add "$(abspath $(f))") --out "$(CURDIR)/target/demo" \
	  -- "$(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release/ipvs-operator-demo" $(foreach f,$(DEMO),"$(abspath $(f))") \
	  --connections $(DEMO_CONNECTIONS) --out "$(CURDIR)/target/demo"

## crd: regenerate deploy/crd.yaml from the Rust types (a test checks they agree).
crd:
	$(CARGO) run --release -q -p ipvs-operator -- crd > deploy/crd.yaml

## bench: the benchmarks; each writes target/bench/<name>.json.
bench: setup bench-ipvs bench-convergence bench-scale
	$(CARGO) bench -p ipvs-operator --bench policy-eval
	$(CARGO) build --release -p ipvs-operator
	$(CARGO) bench -p ipvs-operator-tests --bench footprint
	$(CARGO) bench -p ipvs-operator-tests --bench policy-dir

## image: the container image — a static (musl) binary in an image FROM scratch
## (Containerfile) — built with podman or buildah, exported as an OCI layout to
## target/image/oci, and checked (tests/tests/image.rs). Not part of `make test`:
## the musl build is a second full build (about 6 minutes on 2 cores).
IMAGE ?= localhost/ipvs-operator:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
MUSL_TARGET := x86_64-unknown-linux-musl
# It installs the Debian packages only it needs, when missing: musl-tools
# (musl-gcc, for ring's and wasmtime's C parts) and buildah (when neither podman
# nor buildah is there).
image: setup
	@missing=""; command -v musl-gcc >/dev/null || missing="musl-tools"; \
	command -v podman >/dev/null || command -v buildah >/dev/null || missing="$$missing buildah"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the image:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; } || { \
	    echo "make image needs musl-gcc (Debian package musl-tools) and podman or buildah (packages podman, buildah): could not install$$missing" >&2; exit 1; }; \
	fi
	CC_x86_64_unknown_linux_musl=musl-gcc $(CARGO) build --release --target $(MUSL_TARGET) -p ipvs-operator
	rm -rf target/image && mkdir -p target/image
	cp target/$(MUSL_TARGET)/release/ipvs-operator target/image/ipvs-operator
	strip target/image/ipvs-operator
	@if command -v podman >/dev/null; then \
	  set -x; podman build -f Containerfile -t $(IMAGE) target/image && \
	  podman save --format oci-dir -o target/image/oci $(IMAGE); \
	else \
	  set -x; buildah build --layers=false -f Containerfile -t $(IMAGE) target/image && \
	  buildah push $(IMAGE) oci:target/image/oci:$(IMAGE); \
	fi
	IPVS_OPERATOR_IMAGE_OCI=$(CURDIR)/target/image/oci $(CARGO) test --release -p ipvs-operator-tests --features image-tests --test image -- --nocapture
	@echo "built $(IMAGE) (OCI layout in target/image/oci)"

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
