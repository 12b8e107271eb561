# Ferry — the two commands a new machine needs (Debian with Swift):
#   make quickstart   build, then run `ferry quickstart` (two sites on loopback, a volume over NBD)
#   make test         build, then run every test (unit, simulation, integration with real clients)
# Both install the Debian packages they need when missing.

SWIFT ?= swift
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BUILD_PKGS := pkg-config libzstd-dev libxxhash-dev libsqlite3-dev
TEST_PKGS := qemu-utils libnbd-bin nbdkit fio strace qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio libvirt-daemon-system libvirt-clients \
	curl prometheus chromium systemd lintian dpkg-dev rsync
BENCH_PKGS := $(sort $(TEST_PKGS) restic lsyncd qemu-utils qemu-system-common nbdkit libnbd-bin fio iproute2)
BENCH_ARGS ?=
QUICKSTART_ARGS ?=

.PHONY: quickstart test build release deb bench bench-replication simulate deps-build deps-test clean-data commit-header

# The commit compiled into the binary (`ferry --version`, ferry_build_info): written only when it
# changes, so that an unchanged commit rebuilds nothing.
COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
commit-header:
	@h='#define FERRY_COMMIT "$(COMMIT)"'; f=Sources/CFerrySys/ferry_commit.h; \
	[ "$$(cat $$f 2>/dev/null)" = "$$h" ] || echo "$$h" > $$f

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "ferry: installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps-build:
	$(call apt_install,$(BUILD_PKGS))

deps-test: deps-build
	$(call apt_install,$(TEST_PKGS))

build: deps-build commit-header
	$(SWIFT) build

quickstart: build
	./.build/debug/ferry quickstart $(QUICKSTART_ARGS)

# Integration tests start daemons and real NBD clients; running them one at a time keeps the
# 2-core machines we run on from timing them out.
# The Debian package is built first: the tests check it (dpkg-deb, lintian, the binary on a
# PATH without Swift).
test: deps-test deb
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --no-parallel

# The long run of the deterministic simulation (make test runs 200 schedules):
#   make simulate SCHEDULES=20000 BASE=1
SCHEDULES ?= 20000
BASE ?= 1
simulate: deps-build commit-header
	$(SWIFT) build --build-tests
	FERRY_SIM_SCHEDULES=$(SCHEDULES) FERRY_SIM_BASE=$(BASE) $(SWIFT) test --skip-build --filter FerrySimulationTests

release: deps-build commit-header
	$(SWIFT) build -c release --scratch-path .build-release

# dist/ferry_VERSION_ARCH.deb: the release binary with the Swift runtime linked in, the systemd
# unit, an example config, the alert rules and the docs (deploy/debian/build-deb.sh).
deb: deps-build commit-header
	$(call apt_install,dpkg-dev)
	$(SWIFT) build -c release --scratch-path .build-deb --static-swift-stdlib -Xlinker -z -Xlinker relro -Xlinker -z -Xlinker now
	./deploy/debian/build-deb.sh .build-deb/release/ferry dist

# Benchmarks (BENCHMARKS.md), on the release build; each prints its own tables.
#   make bench               NBD server vs nbdkit and qemu-nbd, then bench-replication
#   make bench-replication   replication modes vs QEMU's sync mirror, then initial sync and catch-up
#   make bench BENCH_ARGS="-r 15 -R 3 -m"   (options for nbd.sh and replication.sh)
# qemu-system-common has qemu-storage-daemon (for the sync mirror), libnbd-bin has nbdcopy.
FERRY_RELEASE_BIN := $(CURDIR)/.build-release/release/ferry
bench: release
	$(call apt_install,$(BENCH_PKGS))
	FERRY_BIN=$(FERRY_RELEASE_BIN) ./Benchmarks/nbd.sh $(BENCH_ARGS)
	FERRY_BIN=$(FERRY_RELEASE_BIN) ./Benchmarks/replication.sh $(BENCH_ARGS)
	FERRY_BIN=$(FERRY_RELEASE_BIN) ./Benchmarks/sync-rates.sh

bench-replication: release
	$(call apt_install,$(BENCH_PKGS))
	FERRY_BIN=$(FERRY_RELEASE_BIN) ./Benchmarks/replication.sh $(BENCH_ARGS)
	FERRY_BIN=$(FERRY_RELEASE_BIN) ./Benchmarks/sync-rates.sh
