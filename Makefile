# Aegis Agent. `make help` lists the targets.

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/aegis-agent/aegis/internal/cli.version=$(VERSION)
BINARIES  := aegis-loader aegis-controlplane aegis-reaper aegisctl
CMDS      := $(wildcard $(addprefix cmd/,$(BINARIES)))
PREFIX    ?= /usr/local
DESTDIR   ?=
# Build tags, e.g. aegis_nextbuild for the upgrade tests' "next release".
GOTAGS    ?=
BIN       ?= bin
# Generated outputs: man pages, completions, the .deb and its staging.
DIST      ?= dist

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
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -tags '$(GOTAGS)' -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./,$(CMDS))

.PHONY: man
man: ## Generate the man pages (roff) from the commands' kong models into dist/man.
	$(GO) run ./internal/docgen -version '$(VERSION)' -man $(DIST)/man

.PHONY: completions
completions: ## Generate bash, zsh and fish completions from the kong models into dist/completions.
	$(GO) run ./internal/docgen -completions $(DIST)/completions

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
MANDIR      ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
DOCDIR      ?= $(PREFIX)/share/doc/aegis-agent
SYSCONFDIR  ?= /etc
UNITS       := $(notdir $(wildcard deploy/systemd/*))
SYSUSERS    := $(notdir $(wildcard deploy/sysusers.d/*.conf))
TMPFILES    := $(notdir $(wildcard deploy/tmpfiles.d/*.conf))
# The guides the units' Documentation= names, and the examples: the
# Prometheus rules and the Grafana dashboard, as in deploy/.
DOCS        := README.md docs/operations.md docs/security.md
EXAMPLES    := prometheus/aegis.rules.yml grafana/aegis.json

.PHONY: install
install: build man completions ## Install binaries, units, sysusers.d, tmpfiles.d, man pages, completions, docs and examples, /etc/aegis/aegis.env (DESTDIR-aware).
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) \
		$(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR) \
		$(addprefix $(DESTDIR)$(DOCDIR)/examples/,$(sort $(dir $(EXAMPLES))))
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/aegis
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/aegis/tls
	install -m 0755 $(addprefix $(BIN)/,$(notdir $(CMDS))) $(DESTDIR)$(BINDIR)/
	for u in $(UNITS); do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' deploy/systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; done
	install -m 0644 $(addprefix deploy/sysusers.d/,$(SYSUSERS)) $(DESTDIR)$(SYSUSERSDIR)/
	install -m 0644 $(addprefix deploy/tmpfiles.d/,$(TMPFILES)) $(DESTDIR)$(TMPFILESDIR)/
	install -m 0644 $(DIST)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 $(DIST)/man/*.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 $(DIST)/completions/bash/* $(DESTDIR)$(BASHCOMPDIR)/
	install -m 0644 $(DIST)/completions/zsh/* $(DESTDIR)$(ZSHCOMPDIR)/
	install -m 0644 $(DIST)/completions/fish/* $(DESTDIR)$(FISHCOMPDIR)/
	install -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/
	for e in $(EXAMPLES); do install -m 0644 deploy/$$e $(DESTDIR)$(DOCDIR)/examples/$$e; done
	test -e $(DESTDIR)$(SYSCONFDIR)/aegis/aegis.env || install -m 0640 deploy/aegis.env $(DESTDIR)$(SYSCONFDIR)/aegis/aegis.env

# The mirror of install. The configuration stays unless it is as
# installed: an edited aegis.env and the certificates in /etc/aegis/tls
# are the admin's. It does not touch the data path (aegis-loader unload).
.PHONY: uninstall
uninstall: ## Remove what make install installed, but an edited aegis.env and the certificates (DESTDIR-aware).
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(notdir $(CMDS)))
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	rm -f $(addprefix $(DESTDIR)$(SYSUSERSDIR)/,$(SYSUSERS)) $(addprefix $(DESTDIR)$(TMPFILESDIR)/,$(TMPFILES))
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(addsuffix .1,$(filter aegisctl,$(notdir $(CMDS)))))
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man8/,$(addsuffix .8,$(filter-out aegisctl,$(notdir $(CMDS)))))
	rm -f $(addprefix $(DESTDIR)$(BASHCOMPDIR)/,$(notdir $(CMDS))) $(addprefix $(DESTDIR)$(ZSHCOMPDIR)/_,$(notdir $(CMDS))) \
		$(addprefix $(DESTDIR)$(FISHCOMPDIR)/,$(addsuffix .fish,$(notdir $(CMDS))))
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(DOCS)) $(addprefix examples/,$(EXAMPLES)))
	-rmdir $(addprefix $(DESTDIR)$(DOCDIR)/examples/,$(sort $(dir $(EXAMPLES)))) $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null
	if cmp -s deploy/aegis.env $(DESTDIR)$(SYSCONFDIR)/aegis/aegis.env; then rm -f $(DESTDIR)$(SYSCONFDIR)/aegis/aegis.env; fi
	-rmdir $(DESTDIR)$(SYSCONFDIR)/aegis/tls $(DESTDIR)$(SYSCONFDIR)/aegis 2>/dev/null

DEB_VERSION ?= $(shell sh scripts/debversion.sh '$(VERSION)')
DEB_ARCH    ?= $(shell $(GO) env GOARCH)
STAGE       := $(DIST)/deb-stage
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
export SOURCE_DATE_EPOCH

.PHONY: deb
deb: build man completions ## Build the Debian package into dist/ with nfpm (see docs/operations.md).
	rm -rf $(STAGE)
	install -d $(STAGE)/bin $(STAGE)/units $(STAGE)/man1 $(STAGE)/man8 $(STAGE)/doc \
		$(addprefix $(STAGE)/examples/,$(sort $(dir $(EXAMPLES))))
	install -m 0755 $(addprefix $(BIN)/,$(notdir $(CMDS))) $(STAGE)/bin/
	for u in $(UNITS); do sed -e 's|@BINDIR@|/usr/bin|g' -e 's|@DOCDIR@|/usr/share/doc/aegis-agent|g' deploy/systemd/$$u > $(STAGE)/units/$$u; done
	for s in 1 8; do for m in $(DIST)/man/*.$$s; do gzip -9n -c $$m > $(STAGE)/man$$s/$$(basename $$m).gz; done; done
	cp -R $(DIST)/completions $(STAGE)/completions
	cp $(DOCS) $(STAGE)/doc/
	for e in $(EXAMPLES); do cp deploy/$$e $(STAGE)/examples/$$e; done
	{ echo "aegis-agent ($(DEB_VERSION)) unstable; urgency=medium"; echo; \
	  echo "  * Built from $(VERSION); the history is the project's git log."; echo; \
	  echo " -- Aegis Agent maintainers <aegis-agent@example.org>  $$(date -u -R -d @$(SOURCE_DATE_EPOCH))"; } \
	  | gzip -9n > $(STAGE)/changelog.gz
	AEGIS_DEB_STAGE=$(STAGE) AEGIS_DEB_VERSION='$(DEB_VERSION)' AEGIS_DEB_ARCH=$(DEB_ARCH) \
		$(GO) tool nfpm package -f deploy/deb/nfpm.yaml -p deb -t $(DIST)/

.PHONY: deb-lint
deb-lint: deb ## Run lintian on the .deb (overrides, each with its reason: deploy/deb/lintian-overrides).
	lintian --pedantic --info --fail-on error,warning $(DIST)/aegis-agent_$(DEB_VERSION)_$(DEB_ARCH).deb

.PHONY: lint
lint: ## gofmt, go vet, and a tidy go.mod.
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	$(GO) mod tidy -diff

.PHONY: clean
clean: ## Remove build outputs.
	rm -rf bin dist .bench
