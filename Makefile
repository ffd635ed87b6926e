# Tandem: `make run` starts a local replicated volume, `make test` sets up and runs the tests.
SHELL := /bin/bash
PY ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the product and its tests need (third-party clients for the interop tests).
APT_PACKAGES := gcc make pkg-config python3-dev python3-venv libffi-dev liburing-dev \
	libnbd-bin python3-libnbd qemu-utils qemu-block-extra fuse3 e2fsprogs \
	libiscsi-bin fio nbdkit tgt iproute2 util-linux procps coreutils \
	qemu-system-x86 open-iscsi linux-image-amd64 busybox-static cpio kmod xz-utils binutils \
	clang libclang-rt-14-dev
STAMP := $(VENV)/.installed
# fio rebuilt with the libiscsi engine (Debian's has only nbd); tests and perf use it.
FIO_ISCSI := /opt/fio-libiscsi/bin/fio

.PHONY: setup apt run test lint fmt clean perf asan fuzz

setup: apt $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q -o DPkg::Lock::Timeout=600 $$missing; \
	fi

# --system-site-packages: Debian's python3-libnbd (the `nbd` module) is a test client.
$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h native/build.py)
	@test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

run: setup
	$(BIN)/tandem up

$(FIO_ISCSI):  # built once (about a minute); delete it to rebuild
	bash perf/build-fio-libiscsi.sh

test: setup $(FIO_ISCSI)
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info native/_native*.so native/_native.c

# Side-by-side benchmark against tgtd, nbdkit and qemu-nbd (not part of `make test`):
# make perf PERF_ARGS="--quick --only tandem-nbd-1,nbdkit"
perf: setup
	$(BIN)/python -m perf.run $(PERF_ARGS)

# The engine built with AddressSanitizer + UBSan (native/_native_asan.abi3.so, objects in
# build/asan) and the engine tests run against it: in-process, and in the replica processes
# they start (TANDEM_NATIVE=asan and LD_PRELOAD reach them through the environment). Suites
# driving qemu tools are left out: qemu's coroutines hang under the inherited preload.
ASAN_REPORT := $(CURDIR)/build/asan/report
ASAN_TESTS := tests/unit/test_engine_*.py tests/integration/test_engine_*.py \
	tests/integration/test_replica_server.py tests/integration/test_faults.py \
	tests/integration/test_iscsi_native.py tests/integration/test_replica_shm.py \
	tests/integration/test_local_reads.py tests/integration/test_stuck_disk.py
asan: setup
	$(BIN)/python native/build.py --asan
	@rm -f $(ASAN_REPORT).*
	TANDEM_NATIVE=asan TANDEM_ENGINE=native \
	ASAN_OPTIONS=detect_leaks=0:log_path=$(ASAN_REPORT) \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(ASAN_REPORT) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	$(BIN)/pytest -q -p no:cacheprovider $(ASAN_TESTS); \
	rc=$$?; if grep -lE "ERROR: AddressSanitizer|runtime error" $(ASAN_REPORT).* 2>/dev/null; \
	then cat $(ASAN_REPORT).*; rc=1; fi; exit $$rc  # (other reports are warnings)

# libFuzzer harnesses of the engine's protocol decoders (native/fuzz/README.md): built with
# clang, ASan and UBSan into build/fuzz/, each run for FUZZ_SECONDS on a temporary copy of its
# seed corpus after the reproducers of known findings (native/fuzz/crashes/); any crash,
# sanitizer report, leak, timeout or hang fails. Needs clang + libFuzzer (`make setup`).
# make fuzz FUZZ_SECONDS=300 FUZZ_HARNESSES=nbd
FUZZ_SECONDS ?= 30
FUZZ_HARNESSES ?= replica nbd iscsi
FUZZ_CC ?= clang
# every engine source (a new protocol file links in by itself); not cffi's output, not the bench
FUZZ_ENGINE := $(filter-out native/_native% native/bench_client.c,$(wildcard native/*.c))
FUZZ_CFLAGS := -g -O1 -std=gnu11 -pthread -Wall -Wextra -Werror -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Inative -Inative/fuzz

build/fuzz/fuzz_%: native/fuzz/fuzz_%.c native/fuzz/fuzz_common.c native/fuzz/fuzz_common.h \
		$(FUZZ_ENGINE) $(wildcard native/*.h)
	@command -v $(FUZZ_CC) >/dev/null || { echo "$(FUZZ_CC) not found: run make setup"; exit 1; }
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $< native/fuzz/fuzz_common.c $(FUZZ_ENGINE) -luring -o $@

fuzz: setup $(addprefix build/fuzz/fuzz_,$(FUZZ_HARNESSES))
	bash native/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_HARNESSES)
