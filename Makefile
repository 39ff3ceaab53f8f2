# Aegis Agent. `make help` lists the targets.

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/aegis-agent/aegis/internal/cli.version=$(VERSION)
BINARIES  := aegis-loader aegis-controlplane aegis-reaper aegisctl
CMDS      := $(wildcard $(addprefix cmd/,$(BINARIES)))
PREFIX    ?= /usr/local
DESTDIR   ?=

# Tests need root (BPF, XDP, network namespaces). CI sets this to 1 so that
# a kernel test that cannot run fails instead of skipping.
AEGIS_REQUIRE_KERNEL_TESTS ?= 1
export AEGIS_REQUIRE_KERNEL_TESTS

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Install the Debian packages the build, tests and demo need; mount bpffs (root).
	@bash scripts/setup.sh

.PHONY: generate
generate: setup ## Regenerate the bpf2go objects and protobuf code (committed).
	$(GO) generate ./...

.PHONY: docs
docs: ## Regenerate the command-line reference in docs/operations.md.
	$(GO) run ./internal/docgen docs/operations.md

.PHONY: build
build: ## Build the binaries into bin/.
	@mkdir -p bin
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ $(addprefix ./,$(CMDS))

.PHONY: test
test: setup ## Run every test, kernel tests included (root).
	$(GO) test -count=1 -timeout 15m ./...

.PHONY: bench
bench: setup ## Run the benchmarks with their baselines; see BENCHMARKS.md.
	bash scripts/bench.sh

.PHONY: demo
demo: setup build ## Show a client blocked, a login, the client passing, idle expiry (root).
	bash scripts/demo.sh

BINDIR      ?= $(PREFIX)/bin
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSCONFDIR  ?= /etc

.PHONY: install
install: build ## Install binaries, systemd units, sysusers.d, tmpfiles.d and /etc/aegis/aegis.env (DESTDIR-aware).
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR)
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/aegis
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/aegis/tls
	install -m 0755 $(addprefix bin/,$(notdir $(CMDS))) $(DESTDIR)$(BINDIR)/
	for u in deploy/systemd/*; do \
		sed 's|@BINDIR@|$(BINDIR)|g' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u) && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u); done
	install -m 0644 deploy/sysusers.d/aegis.conf $(DESTDIR)$(SYSUSERSDIR)/aegis.conf
	install -m 0644 deploy/tmpfiles.d/aegis.conf $(DESTDIR)$(TMPFILESDIR)/aegis.conf
	test -e $(DESTDIR)$(SYSCONFDIR)/aegis/aegis.env || install -m 0640 deploy/aegis.env $(DESTDIR)$(SYSCONFDIR)/aegis/aegis.env

.PHONY: lint
lint: ## gofmt, go vet, and a tidy go.mod.
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	$(GO) mod tidy -diff

.PHONY: clean
clean: ## Remove build outputs.
	rm -rf bin dist .bench
