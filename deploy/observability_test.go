// Package deploy_test checks the Prometheus rules and the Grafana
// dashboard against the metrics the real daemons export: promtool lints
// every daemon's scrape and runs the rules' unit tests, and every metric
// a panel or a rule reads must be one a daemon exports.
package deploy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/pki"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
	"github.com/aegis-agent/aegis/reaper"
)

const (
	rulesFile     = "prometheus/aegis.rules.yml"
	rulesTestFile = "prometheus/aegis.rules.test.yml"
	dashboardFile = "grafana/aegis.json"
)

// promtool returns promtool's path. CI installs it (make setup); where
// kernel tests are required, its absence is a failure, never a skip.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv(tu.RequireKernelEnv) == "1" {
			t.Fatalf("promtool not installed (Debian package prometheus; make setup installs it) and %s=1", tu.RequireKernelEnv)
		}
		t.Skip("promtool not installed (Debian package prometheus)")
	}
	return p
}

func TestRules(t *testing.T) {
	pt := promtool(t)
	for _, args := range [][]string{{"check", "rules", rulesFile}, {"test", "rules", rulesTestFile}} {
		out, err := exec.Command(pt, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestExportedMetrics runs the loader, the reaper and the control plane
// (the real command lines, in-process) on real pinned maps, lints each
// daemon's /metrics with promtool, and checks that every metric the
// dashboard and the rules read is exported by one of them.
func TestExportedMetrics(t *testing.T) {
	pt := promtool(t)
	scrapes := daemonScrapes(t)

	exported := map[string]string{} // name -> daemon
	for daemon, body := range scrapes {
		cmd := exec.Command(pt, "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		out, err := cmd.CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) != 0 {
			t.Errorf("promtool check metrics on %s's scrape: %v\n%s", daemon, err, out)
		}
		for _, name := range scrapeNames(body) {
			if other, ok := exported[name]; ok && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") &&
				!strings.HasPrefix(name, "promhttp_") && name != "aegis_build_info" {
				// One name, one meaning, one process (aegis_build_info is
				// per process by design; Prometheus's job label tells
				// them apart).
				t.Errorf("%s is exported by both %s and %s", name, other, daemon)
			}
			exported[name] = daemon
		}
	}
	for _, q := range dashboardQueries(t) {
		checkNames(t, "dashboard panel "+q.where, q.expr, exported)
	}
	for _, q := range ruleQueries(t) {
		checkNames(t, "rule "+q.where, q.expr, exported)
	}
}

func checkNames(t *testing.T, where, expr string, exported map[string]string) {
	t.Helper()
	names := promqlMetricNames(expr)
	if len(names) == 0 {
		t.Errorf("%s: no metric name found in %q", where, expr)
	}
	for _, n := range names {
		if _, ok := exported[n]; !ok {
			t.Errorf("%s reads %s, which no daemon exports (expr %q)", where, n, expr)
		}
	}
}

// daemonScrapes returns each daemon's /metrics body.
func daemonScrapes(t *testing.T) map[string]string {
	t.Helper()
	ns := tu.NewNetns(t, "aegis-obs-")
	ns.AddVeth(t, "o0", "o1")
	pin := tu.PinDir(t)
	var out bytes.Buffer
	var code int
	if err := ns.Do(func() error {
		code = loader.Main(context.Background(), []string{"load", "-i", "o0", "--group", "root", "--pin-path", pin,
			"--allow", "203.0.113.0/24,tcp/22", "--log-format", "json"}, cli.IO{Stdout: &out, Stderr: &out})
		return nil
	}); err != nil || code != 0 {
		t.Fatalf("aegis-loader load: exit %d %v\n%s", code, err, out.String())
	}

	dir := t.TempDir()
	ca, err := pki.NewCA("metrics test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.IssueServer(pki.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, caFile := filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"), filepath.Join(dir, "ca.crt")
	if err := srv.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFile(caFile, ca.CertPEM); err != nil {
		t.Fatal(err)
	}

	reaperAddr, cpAddr := freeAddr(t), freeAddr(t)
	run(t, "aegis-reaper", reaper.Main, "--pin-path", pin, "--metrics-address", reaperAddr, "--cleanup-interval", "1s")
	run(t, "aegis-controlplane", controlplane.Main, "--pin-path", pin, "--metrics-address", cpAddr,
		"--listen-address", "127.0.0.1", "--grpc-port", "0", "--tls-cert", certFile, "--tls-key", keyFile, "--tls-client-ca", caFile)

	return map[string]string{
		"aegis-reaper":       waitScrape(t, reaperAddr, "aegis_reaper_last_sweep_timestamp_seconds"),
		"aegis-controlplane": waitScrape(t, cpAddr, "aegis_controlplane_datapath_loaded 1"),
	}
}

// run runs a daemon's Main until the test ends.
func run(t *testing.T, name string, main func(context.Context, []string, cli.IO) int, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	log := &tu.Buffer{}
	done := make(chan int, 1)
	go func() { done <- main(ctx, append(args, "--log-format", "json"), cli.IO{Stdout: log, Stderr: log}) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Errorf("%s did not stop", name)
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", name, log.String())
		}
	})
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitScrape scrapes addr until the body holds want.
func waitScrape(t *testing.T, addr, want string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), "\n"+want) {
				return string(b)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q on http://%s/metrics", want, addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// scrapeNames lists the series names a text-format scrape holds: each
// family's name, and for histograms and summaries the names PromQL sees.
func scrapeNames(body string) []string {
	var out []string
	for _, line := range strings.Split(body, "\n") {
		f := strings.Fields(line)
		if len(f) != 4 || f[0] != "#" || f[1] != "TYPE" {
			continue
		}
		switch f[3] {
		case "histogram":
			out = append(out, f[2]+"_bucket", f[2]+"_sum", f[2]+"_count")
		case "summary":
			out = append(out, f[2], f[2]+"_sum", f[2]+"_count")
		default:
			out = append(out, f[2])
		}
	}
	return out
}

type query struct{ where, expr string }

func dashboardQueries(t *testing.T) []query {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var out []query
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			out = append(out, query{fmt.Sprintf("%q", p.Title), tg.Expr})
		}
	}
	labelValues := regexp.MustCompile(`^label_values\((\w+),`)
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(map[string]any); ok {
			if m := labelValues.FindStringSubmatch(fmt.Sprint(q["query"])); m != nil {
				out = append(out, query{"variable " + v.Name, m[1]})
			}
		}
	}
	if len(out) < 20 {
		t.Fatalf("only %d queries in the dashboard", len(out))
	}
	return out
}

func ruleQueries(t *testing.T) []query {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	var out []query
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			out = append(out, query{r.Alert, r.Expr})
		}
	}
	if len(out) < 10 {
		t.Fatalf("only %d rules", len(out))
	}
	return out
}

// PromQL's words that are not metric names.
var promqlKeywords = []string{"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2", "by", "without",
	"on", "ignoring", "group_left", "group_right"}

var (
	promqlStrings  = regexp.MustCompile(`"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|` + "`[^`]*`")
	promqlMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promqlRanges   = regexp.MustCompile(`\[[^\]]*\]`)
	promqlGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlTokens   = regexp.MustCompile(`[0-9][0-9a-zA-Z_.]*|[a-zA-Z_:][a-zA-Z0-9_:]*`)
)

// promqlMetricNames returns the metric names an expression selects: with
// strings, label matchers, ranges and grouping labels removed, every
// identifier that is not a keyword, a number or a function (an identifier
// followed by "("). A careful scan rather than the Prometheus parser,
// whose module would bring the server's dependency graph into go.sum.
func promqlMetricNames(expr string) []string {
	s := promqlStrings.ReplaceAllString(expr, `""`)
	s = promqlMatchers.ReplaceAllString(s, " ")
	s = promqlRanges.ReplaceAllString(s, " ")
	s = promqlGrouping.ReplaceAllString(s, " ")
	seen := map[string]bool{}
	for _, loc := range promqlTokens.FindAllStringIndex(s, -1) {
		tok := s[loc[0]:loc[1]]
		rest := strings.TrimLeft(s[loc[1]:], " \t\n")
		switch {
		case tok[0] >= '0' && tok[0] <= '9', slices.Contains(promqlKeywords, tok), strings.HasPrefix(rest, "("):
			continue
		case loc[0] > 0 && s[loc[0]-1] == '$': // a Grafana variable
			continue
		}
		seen[tok] = true
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func TestPromQLMetricNames(t *testing.T) {
	for expr, want := range map[string]string{
		`aegis_datapath_attached == 0`: "aegis_datapath_attached",
		`sum by (job, instance) (rate(aegis_datapath_packets_total{reason=~"no_session|expired"}[5m])) > 3 * sum by (job, instance) (rate(aegis_datapath_packets_total{reason=~"a{b}"}[1h] offset 5m))`: "aegis_datapath_packets_total",
		`histogram_quantile(0.99, sum by (le, grpc_method) (rate(aegis_grpc_server_handling_seconds_bucket{instance=~"$controlplane"}[$__rate_interval])))`:                                             "aegis_grpc_server_handling_seconds_bucket",
		`(time() - a_ts > 3 * b_interval) and on (job, instance) c_loaded == 1`:                                                                                                                         "a_ts b_interval c_loaded",
		`absent(aegis_datapath_loaded)`:                                                 "aegis_datapath_loaded",
		`x_total / ignoring(reason) group_left y_total * 1e3 + 0x1f`:                    "x_total y_total",
		`sum(rate(m[5m])) without (le)`:                                                 "m",
		`aegis_controlplane_certificate_expiry_timestamp_seconds - time() < 14 * 86400`: "aegis_controlplane_certificate_expiry_timestamp_seconds",
	} {
		if got := strings.Join(promqlMetricNames(expr), " "); got != want {
			t.Errorf("%s: %q, want %q", expr, got, want)
		}
	}
}
