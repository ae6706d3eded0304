# The test VM (tests/vm/README.md): the kernel tests and the IPVS benchmark
# run inside QEMU with Debian's cloud kernel, downloaded once into target/vm.
# Included by the top-level Makefile.

VM_RUN := $(CURDIR)/tests/vm/run
# Cargo runs each test (or bench) executable as `tests/vm/run -- EXE ARGS…`.
VM_CARGO_RUNNER := CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$(VM_RUN) --"

.PHONY: test-kernel bench-ipvs bench-convergence bench-scale bench-standalone soak-churn vm-binaries soak-faults soak

## vm-binaries: the project binaries the VM tests start (the VM runner copies
## every executable of target/release into the guest).
vm-binaries:
	$(CARGO) build --release -p ipvs-operator -p traffic -p ipvs-operator-tests

## test-kernel: the kernel tests, inside the VM: the ipvs crate's, the
## kube-proxy emulator's (tests/tests/kube_proxy_kernel.rs), and the end-to-end
## tests of the controller and agent (tests/tests/e2e.rs), of standalone
## mode (tests/tests/standalone_kernel.rs: its pieces, and the agent serving
## a Service with no kube-proxy and handing it over to one; and
## tests/tests/node_setup_kernel.rs: `node-setup` in a fresh VM), of dual-stack
## Services (tests/tests/e2e_ipv6.rs), of every Service topology and the
## agent's state across restarts (tests/tests/e2e_topology.rs), and of the policies
## (tests/tests/e2e_policies.rs), and the fault suite, shortened
## (tests/tests/faults.rs: 3 s per fault phase, about 2 minutes).
test-kernel: setup vm-binaries
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs --features kernel-tests --test kernel --test kernel_no_module
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test kube_proxy_kernel
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test e2e
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test standalone_kernel
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test node_setup_kernel
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test e2e_ipv6
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test e2e_topology
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test e2e_policies
	$(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test faults -- --test-threads 6

## bench-ipvs: 10,000 weight changes, ours against ipvsadm -R, in the VM;
## writes target/bench/ipvs-apply.json (the guest's target/bench comes back).
bench-ipvs: setup vm-binaries
	mkdir -p target/bench
	IPVS_VM_OUT="$(CURDIR)/target/bench" $(VM_CARGO_RUNNER) $(CARGO) bench -p ipvs --features kernel-tests --bench ipvs-apply
	@cat target/bench/ipvs-apply.json

## bench-standalone: a ClusterIP the agent serves itself (standalone mode)
## against one the kube-proxy emulator serves, same pods, in the VM: connection
## rate and latency (ratio of medians over alternating runs; goal within 5 %,
## a miss is reported) and endpoint convergence into each (p50, p99); writes
## target/bench/standalone.json. About 3 minutes.
bench-standalone: setup vm-binaries
	mkdir -p target/bench
	IPVS_VM_OUT="$(CURDIR)/target/bench" $(VM_CARGO_RUNNER) $(CARGO) bench -p ipvs-operator-tests --features kernel-tests --bench standalone
	@cat target/bench/standalone.json

## bench-convergence: the real agent at scale in the VM — 1,000
## WeightedServices, 10,000 endpoints, the kube-proxy emulator: edit -> kernel
## latency (p50, p99 of 100 edits), resident memory, idle CPU, against the same
## weight changes written directly; writes target/bench/convergence.json.
## About 5 minutes under the VM's emulated CPU.
bench-convergence: setup vm-binaries
	mkdir -p target/bench
	IPVS_VM_MEM=4096 IPVS_VM_TIMEOUT=1800 IPVS_VM_OUT="$(CURDIR)/target/bench" \
	  $(VM_CARGO_RUNNER) $(CARGO) bench -p ipvs-operator-tests --features kernel-tests --bench convergence
	@cat target/bench/convergence.json

## bench-scale: the same bench at issue 8's scale — 5,000 WeightedServices,
## 50,000 endpoints — plus an agent restart with edits made while it was down,
## the controller's status writes under pod label churn, idle CPU per thread,
## and (SCALE_PERF=1, the default when the host has `perf`, which the VM then
## gets) a profile of the agent idle and restarting; writes
## target/bench/scale.json and target/bench/scale-profile-*.txt. About 25
## minutes under the VM's emulated CPU.
SCALE_PERF ?= $(if $(shell command -v perf),1,0)
bench-scale: setup vm-binaries
	mkdir -p target/bench
	SCALE_PERF=$(SCALE_PERF) IPVS_VM_ENV="SCALE_PERF SCALE_SERVICES SCALE_PODS SCALE_EDITS SCALE_IDLE_SECONDS SCALE_RESTART_EDITS SCALE_CHURN_SECONDS SCALE_AGENT_LOG" \
	  IPVS_VM_ADD="$(if $(filter 1,$(SCALE_PERF)),$(shell command -v perf))" \
	  IPVS_VM_MEM=6144 IPVS_VM_TIMEOUT=3600 IPVS_VM_OUT="$(CURDIR)/target/bench" \
	  $(VM_CARGO_RUNNER) $(CARGO) bench -p ipvs-operator-tests --features kernel-tests --bench scale
	@cat target/bench/scale.json

## soak-churn: the churn soak, in the VM: for SOAK_CHURN_SECONDS (600), pods
## created and deleted and labels flipped every 100 ms across 50
## WeightedServices, their policy module replaced every 30 s; fails when the
## agent's resident memory grows after warm-up or a kernel sample is
## inconsistent; writes target/soak/churn.json (writes per second, change ->
## kernel latency).
SOAK_CHURN_SECONDS ?= 600
soak-churn: setup vm-binaries
	mkdir -p target/soak
	SOAK_CHURN_SECONDS=$(SOAK_CHURN_SECONDS) IPVS_VM_ENV="SOAK_CHURN_SECONDS SOAK_CHURN_RELOAD_SECONDS" IPVS_VM_MEM=4096 \
	  IPVS_VM_TIMEOUT=$$(( $(SOAK_CHURN_SECONDS) + 1200 )) IPVS_VM_OUT="$(CURDIR)/target/soak" \
	  $(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test soak_churn -- --nocapture
	@cat target/soak/churn.json

## soak-faults: the fault suite at full length, in the VM: each fault phase
## (watches cut, 410s, 500/503/429 bursts, kube-proxy fights, virtual services
## vanishing, a failing policy rollout, SIGKILLs, two controllers) lasts
## FAULTS_SECONDS (60) instead of make test's 3. About 5 minutes in the VM.
FAULTS_SECONDS ?= 60
soak-faults: setup vm-binaries
	IPVS_FAULTS_SECONDS=$(FAULTS_SECONDS) IPVS_VM_ENV="IPVS_FAULTS_SECONDS" IPVS_VM_TIMEOUT=3600 \
	  $(VM_CARGO_RUNNER) $(CARGO) test --release -p ipvs-operator-tests --features kernel-tests --test faults -- --test-threads 6 --nocapture

## soak: the soaks (issue 8).
soak: soak-faults soak-churn

## clean-vm: forget the downloaded kernel and the cached base initramfs.
clean-vm:
	rm -rf target/vm
