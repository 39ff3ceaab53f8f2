package reaper_test

import (
	"io"
	"net/http"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
)

// scrapeSafe is scrape that returns "" while the endpoint is not up.
func scrapeSafe(addr string) string {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func cliVersion() string { return cli.Version() }

// pinnedTag is the kernel's tag of the pinned program.
func pinnedTag(t *testing.T, pin string) string {
	t.Helper()
	p, err := ebpf.LoadPinnedProgram(state.ProgramPath(pin), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.Tag
}
