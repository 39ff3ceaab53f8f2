package aegisctl_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/internal/cli"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// A control plane restarted under watch: one line when the connection is
// lost, one when it is back, frames before and after, exit 0 at the end.
func TestWatchReconnects(t *testing.T) {
	pin := tu.PinDir(t)
	tu.PinMaps(t, pin, tu.PinOptions{DefaultIdleTimeout: time.Minute})
	dir := pkiDir(t)
	addr, stop := startControlPlane(t, pin, loadCerts(t, dir), nil, "127.0.0.1:0")
	conn := []string{"--address", addr, "--tls-cert", dir + "/aegis-controller.crt", "--tls-key", dir + "/aegis-controller.key",
		"--tls-ca", dir + "/ca.crt", "--timeout", "5s"}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr tu.Buffer
	exited := make(chan int, 1)
	go func() {
		exited <- aegisctl.Main(ctx, append([]string{"watch", "--interval", "100ms"}, conn...), cli.IO{Stdout: &stdout, Stderr: &stderr})
	}()
	frames := func() int { return strings.Count(stdout.String(), "aegisctl watch ") }
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(20 * time.Millisecond) {
			select {
			case code := <-exited:
				t.Fatalf("watch exited %d while waiting for %s\nstdout:\n%s\nstderr:\n%s", code, what, stdout.String(), stderr.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s\nstdout:\n%s\nstderr:\n%s", what, stdout.String(), stderr.String())
			}
		}
	}
	waitFor("first frames", func() bool { return frames() >= 2 })
	stop()
	waitFor("line for the lost connection", func() bool {
		return strings.Contains(stderr.String(), "lost the control plane at "+addr+", reconnecting: get stats: ")
	})
	before := frames()
	time.Sleep(700 * time.Millisecond) // an attempt or two fail
	startControlPlane(t, pin, loadCerts(t, dir), nil, addr)
	waitFor("line for the connection back", func() bool { return strings.Contains(stderr.String(), "connected to "+addr+" again") })
	waitFor("frames after the restart", func() bool { return frames() >= before+2 })
	cancel()
	select {
	case code := <-exited:
		if code != 0 {
			t.Fatalf("watch exited %d\n%s", code, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch did not stop when its context ended")
	}
	t.Log(stderr.String())
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "aegisctl: watch: lost the control plane at "+addr+", reconnecting: get stats: cannot reach") {
		t.Fatalf("stderr, want two lines:\n%s", stderr.String())
	}
}

// A failure that waiting cannot fix ends watch at once.
func TestWatchStopsOnConfigurationErrors(t *testing.T) {
	e := newEnv(t)
	r := run(append(e.cmd("watch", "--interval", "100ms"), "--server-name", "gw9.example.org", "--timeout", "2s")...)
	if r.code != 1 || !strings.Contains(r.stderr, "not valid for --server-name gw9.example.org") {
		t.Fatalf("%+v", r)
	}
}

// observe follows a control plane that restarts as watch does: one line
// when the stream is lost, one when it is open again, exit 0 at the end.
// (That events flow after a reconnect is shown with real packets by the
// e2e tests of observe, which follow a full reload of the data path.)
func TestObserveReconnects(t *testing.T) {
	pin := tu.PinDir(t)
	tu.PinMaps(t, pin, tu.PinOptions{DefaultIdleTimeout: time.Minute})
	dir := pkiDir(t)
	addr, stop := startControlPlane(t, pin, loadCerts(t, dir), nil, "127.0.0.1:0")
	conn := []string{"--address", addr, "--tls-cert", dir + "/aegis-controller.crt", "--tls-key", dir + "/aegis-controller.key",
		"--tls-ca", dir + "/ca.crt", "--timeout", "5s"}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr tu.Buffer
	exited := make(chan int, 1)
	go func() {
		exited <- aegisctl.Main(ctx, append([]string{"observe"}, conn...), cli.IO{Stdout: &stdout, Stderr: &stderr})
	}()
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(20 * time.Millisecond) {
			select {
			case code := <-exited:
				t.Fatalf("observe exited %d while waiting for %s\nstdout:\n%s\nstderr:\n%s", code, what, stdout.String(), stderr.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s\nstdout:\n%s\nstderr:\n%s", what, stdout.String(), stderr.String())
			}
		}
	}
	waitFor("the table header", func() bool { return strings.Contains(stdout.String(), "TIME") })
	time.Sleep(200 * time.Millisecond) // the stream is open on the server
	stop()
	waitFor("line for the lost stream", func() bool {
		return strings.Contains(stderr.String(), "aegisctl: observe: lost the control plane at "+addr+", reconnecting: ")
	})
	time.Sleep(700 * time.Millisecond) // an attempt or two fail
	startControlPlane(t, pin, loadCerts(t, dir), nil, addr)
	waitFor("line for the connection back", func() bool {
		return strings.Contains(stderr.String(), "aegisctl: observe: connected to "+addr+" again")
	})
	cancel()
	select {
	case code := <-exited:
		if code != 0 {
			t.Fatalf("observe exited %d\n%s", code, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("observe did not stop when its context ended")
	}
	if lines := strings.Split(strings.TrimSpace(stderr.String()), "\n"); len(lines) != 2 {
		t.Fatalf("stderr, want two lines:\n%s", stderr.String())
	}
}
