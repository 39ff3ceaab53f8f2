package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// operator is an SSH-like TCP connection from the client namespace through
// the gateway's filtered interface to a listener on the gateway itself.
type operator struct {
	t    *testing.T
	conn net.Conn
	// env is SSH_CONNECTION as sshd would set it for this connection.
	env string
}

const operatorPort = 2222

var operatorAddr = netip.AddrPortFrom(tu.GatewayPubV4, operatorPort)

// connectOperator starts an echo listener in the gateway namespace and
// connects to it from the client.
func connectOperator(t *testing.T, g *gateway) *operator {
	t.Helper()
	var ln net.Listener
	if err := g.Gateway.Do(func() (err error) {
		ln, err = net.Listen("tcp", operatorAddr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	o := &operator{t: t}
	if err := g.Client.Do(func() (err error) {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(tu.ClientV4, 0)), Timeout: 5 * time.Second}
		o.conn, err = d.Dial("tcp", operatorAddr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.conn.Close() })
	local := o.conn.LocalAddr().(*net.TCPAddr).AddrPort()
	o.env = fmt.Sprintf("SSH_CONNECTION=%s %d %s %d", local.Addr(), local.Port(), operatorAddr.Addr(), operatorAddr.Port())
	return o
}

// echo sends a line over the operator's connection and waits up to
// timeout for it to come back.
func (o *operator) echo(msg string, timeout time.Duration) error {
	_ = o.conn.SetDeadline(time.Now().Add(timeout))
	if _, err := o.conn.Write([]byte(msg + "\n")); err != nil {
		return err
	}
	return o.await(msg, timeout)
}

// await waits for a line sent earlier to come back.
func (o *operator) await(msg string, timeout time.Duration) error {
	_ = o.conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, len(msg)+1)
	if _, err := io.ReadFull(o.conn, buf); err != nil {
		return err
	}
	if string(buf) != msg+"\n" {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// loaderEnv is the environment for an aegis-loader run: the test's own
// without any SSH variables (the machine running the tests may itself be
// reached over SSH), plus extra.
func loaderEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SSH_") && !strings.HasPrefix(kv, "AEGIS_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// try runs aegis-loader in the gateway namespace with env and returns its
// exit code and combined output.
func (g *gateway) try(env []string, args ...string) (int, string) {
	g.t.Helper()
	full := []string{args[0]}
	if args[0] == "load" {
		full = append(full, "-i", tu.PublicIface, "-c", tu.ControllerV4.String(), "--group", "root")
	}
	full = append(full, "--pin-path", g.pin)
	full = append(full, args[1:]...)
	cmd := g.Gateway.Command(bin("aegis-loader"), full...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		g.t.Fatal(err)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

// observed is everything a load could change: the bpffs tree around the
// pin directory, the handshake files and the XDP hook of the interface.
func (g *gateway) observed() string {
	g.t.Helper()
	var b strings.Builder
	parent := filepath.Dir(g.pin)
	entries, _ := os.ReadDir(parent)
	for _, e := range entries {
		if strings.HasPrefix(filepath.Join(parent, e.Name()), g.pin) {
			fmt.Fprintf(&b, "pin dir entry %s\n", e.Name())
		}
	}
	_ = filepath.WalkDir(g.pin, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			fi, _ := d.Info()
			fmt.Fprintf(&b, "%s %v %v\n", p, fi.Mode(), fi.ModTime().UnixNano())
		}
		return nil
	})
	// The rollback timer's log is a record the operator may read, kept.
	run, _ := filepath.Glob(g.handshake() + ".*[^g]")
	sort.Strings(run)
	fmt.Fprintf(&b, "handshake %v\n", run)
	fmt.Fprintf(&b, "xdp %+v\n", g.xdp())
	return b.String()
}

// handshake is the stem of the confirm-or-rollback files of the pin
// directory; they are removed when the test ends.
func (g *gateway) handshake() string {
	stem := "/run/aegis/confirm-" + strings.ReplaceAll(strings.Trim(g.pin, "/"), "/", "-")
	g.t.Cleanup(func() {
		files, _ := filepath.Glob(stem + ".*")
		for _, f := range files {
			_ = os.Remove(f)
		}
	})
	return stem
}

// xdp is what netlink reports at the public interface's XDP hook.
func (g *gateway) xdp() netlink.LinkXdp {
	g.t.Helper()
	var x netlink.LinkXdp
	if err := g.Gateway.Do(func() error {
		l, err := netlink.LinkByName(tu.PublicIface)
		if err != nil {
			return err
		}
		if l.Attrs().Xdp != nil {
			x = *l.Attrs().Xdp
		}
		return nil
	}); err != nil {
		g.t.Fatal(err)
	}
	return x
}

// A load that would cut the operator's own SSH session is refused and
// changes nothing; an allow rule covering the session, or monitor mode,
// lets it through; --dry-run shows the finding and changes nothing.
func TestLockoutGuard(t *testing.T) {
	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	op := connectOperator(t, g)
	if err := op.echo("before", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	env := loaderEnv(op.env)
	before := g.observed()
	client := strings.Fields(strings.TrimPrefix(op.env, "SSH_CONNECTION="))[0]
	rule := fmt.Sprintf("%s/32,tcp/%d", client, operatorPort)

	t.Run("refused, nothing changed", func(t *testing.T) {
		code, out := g.try(env, "load")
		if code == 0 || !strings.Contains(out, "refusing to cut the operator's own connection") ||
			!strings.Contains(out, "--allow "+rule) || !strings.Contains(out, "SSH_CONNECTION") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		if after := g.observed(); after != before {
			t.Fatalf("a refused load changed something:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		if err := op.echo("refused", 5*time.Second); err != nil {
			t.Fatalf("the session broke: %v", err)
		}
	})

	t.Run("dry run reports it and changes nothing", func(t *testing.T) {
		code, out := g.try(env, "load", "--dry-run")
		if code != 0 || !strings.Contains(out, "REFUSED") || !strings.Contains(out, "new install") ||
			!strings.Contains(out, "controller login: tcp to "+tu.ControllerV4.String()+":443") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		code, out = g.try(env, "load", "--dry-run", "--json", "--log-level", "error")
		var plan struct {
			Change     string `json:"change"`
			Refused    string `json:"refused"`
			Interfaces []struct {
				Name   string `json:"name"`
				Exists bool   `json:"exists"`
				Action string `json:"action"`
			} `json:"interfaces"`
			Lockout []struct {
				Severity, Src, Verdict, Reason string
			} `json:"lockout"`
		}
		if err := json.Unmarshal([]byte(out), &plan); err != nil || code != 0 {
			t.Fatalf("exit %d, %v:\n%s", code, err, out)
		}
		if plan.Change != "new install" || plan.Refused == "" || len(plan.Interfaces) != 1 ||
			plan.Interfaces[0].Action != "attach" || !plan.Interfaces[0].Exists ||
			len(plan.Lockout) != 1 || plan.Lockout[0].Severity != "refuse" || plan.Lockout[0].Reason != "no_session" {
			t.Fatalf("plan %+v", plan)
		}
		if after := g.observed(); after != before {
			t.Fatalf("a dry run changed something:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("an allow rule covering the session lets it load", func(t *testing.T) {
		code, out := g.try(env, "load", "--allow", rule)
		if code != 0 {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		if !g.xdp().Attached {
			t.Fatal("not attached")
		}
		if err := op.echo("allowed", 5*time.Second); err != nil {
			t.Fatalf("the session broke under the filter: %v", err)
		}
		// The same build and config, in a dry run: nothing to do.
		before := g.observed()
		code, out = g.try(env, "load", "--allow", rule, "--dry-run")
		if code != 0 || !strings.Contains(out, "no change") || !strings.Contains(out, "keep") || strings.Contains(out, "REFUSED") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		// Dropping the rule is a config change the dry run names, and
		// the check refuses.
		code, out = g.try(env, "load", "--dry-run")
		if code != 0 || !strings.Contains(out, "allow") || !strings.Contains(out, rule) || !strings.Contains(out, "REFUSED") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		if code, out := g.try(env, "load"); code == 0 || !strings.Contains(out, "refusing to cut") {
			t.Fatalf("removing the rule that carries the session was not refused: exit %d:\n%s", code, out)
		}
		if after := g.observed(); after != before {
			t.Fatalf("changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		g.try(env, "unload")
	})

	t.Run("monitor mode never drops", func(t *testing.T) {
		code, out := g.try(env, "load", "--monitor")
		if code != 0 || !g.xdp().Attached {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		if err := op.echo("monitor", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		g.try(env, "unload")
	})

	t.Run("the session is found from sshd's sockets without SSH_CONNECTION", func(t *testing.T) {
		socat, err := exec.LookPath("socat")
		if err != nil {
			t.Fatal("socat not installed (make setup installs it)")
		}
		// sshd, as far as the process tree says: socat renamed, serving
		// one connection with aegis-loader as the session's command. The
		// command runs under a shell that exits 0: socat may close the
		// connection before relaying the output of a child that failed.
		dir := t.TempDir()
		sshd := filepath.Join(dir, "sshd")
		b, err := os.ReadFile(socat)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(sshd, b, 0o755); err != nil {
			t.Fatal(err)
		}
		loadCmd := fmt.Sprintf("%s load -i %s -c %s --group root --pin-path %s --log-format json",
			bin("aegis-loader"), tu.PublicIface, tu.ControllerV4, g.pin)
		srv := g.Gateway.Command(sshd, fmt.Sprintf("TCP-LISTEN:%d,bind=%s,reuseaddr", operatorPort+1, tu.GatewayPubV4),
			"SYSTEM:"+loadCmd+" 2>&1; true")
		srv.Env = loaderEnv()
		var srvOut bytes.Buffer
		srv.Stdout, srv.Stderr = &srvOut, &srvOut
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
		var out string
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := g.Client.Do(func() error {
				c, err := net.DialTimeout("tcp", netip.AddrPortFrom(tu.GatewayPubV4, operatorPort+1).String(), 2*time.Second)
				if err != nil {
					return err
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				b, err := io.ReadAll(bufio.NewReader(c))
				out = string(b)
				return err
			})
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if !strings.Contains(out, "refusing to cut") || !strings.Contains(out, "sockets of sshd") {
			t.Fatalf("loader output over the session:\n%s\nsocat: %s", out, srvOut.String())
		}
		if after := g.observed(); after != before {
			t.Fatalf("changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}

// load --confirm-within rolls back when no confirmation comes: the cut
// session works again. Confirmed, the filter stays.
func TestConfirmOrRollback(t *testing.T) {
	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	op := connectOperator(t, g)
	env := loaderEnv(op.env)
	before := g.observed()

	t.Run("not confirmed: no filter before, none after", func(t *testing.T) {
		start := time.Now()
		code, out := make(chan int, 1), make(chan string, 1)
		go func() {
			c, o := g.try(env, "load", "--no-lockout-check", "--confirm-within", "3s")
			code <- c
			out <- o
		}()
		// Wait for the cut, then send into it.
		for !g.xdp().Attached {
			if time.Since(start) > 10*time.Second {
				t.Fatal("never attached")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := op.echo("cut", time.Second); err == nil {
			t.Fatal("the session passes a filter that should cut it: the test proves nothing")
		}
		c, o := <-code, <-out
		if c == 0 || !strings.Contains(o, "rolled back") || time.Since(start) < 3*time.Second {
			t.Fatalf("exit %d after %v:\n%s", c, time.Since(start), o)
		}
		// The segment sent into the cut is retransmitted and answered.
		if err := op.await("cut", 10*time.Second); err != nil {
			t.Fatalf("the session did not recover after the rollback: %v", err)
		}
		if err := op.echo("after", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if after := g.observed(); after != before {
			t.Fatalf("the rollback left something:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("not confirmed: the previous config and program come back", func(t *testing.T) {
		rule := fmt.Sprintf("%s/32,tcp/%d", tu.ClientV4, operatorPort)
		if code, out := g.try(env, "load", "--allow", rule); code != 0 {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		tag := func() string {
			code, out := g.try(env, "status", "--json")
			var st struct {
				Interfaces []struct{ Tag string } `json:"interfaces"`
				Allow      []string               `json:"allow"`
			}
			if err := json.Unmarshal([]byte(out), &st); err != nil || code != 0 || len(st.Interfaces) != 1 {
				t.Fatalf("status: %v\n%s", err, out)
			}
			return st.Interfaces[0].Tag + " " + strings.Join(st.Allow, ",")
		}
		was := tag()
		// A new build, without the rule, on one more interface.
		cmd := g.Gateway.Command(bin("aegis-loader-next"), "load", "-i", tu.PublicIface, "-i", "priv0", "-c", tu.ControllerV4.String(),
			"--group", "root", "--pin-path", g.pin, "--no-lockout-check", "--confirm-within", "3s")
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "rolled back") {
			t.Fatalf("%v:\n%s", err, out)
		}
		// status exits 0 only if every configured interface is filtered:
		// priv0 is neither attached nor configured any more.
		if now := tag(); now != was {
			t.Fatalf("after the rollback: %q, before the load: %q", now, was)
		}
		if _, err := os.Stat(state.LinkPath(g.pin, "priv0")); err == nil {
			t.Fatal("the interface the load added is still attached")
		}
		if err := op.echo("restored", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		g.try(env, "unload")
	})

	t.Run("confirmed: the filter stays", func(t *testing.T) {
		cmd := g.Gateway.Command(bin("aegis-loader"), "load", "-i", tu.PublicIface, "-c", tu.ControllerV4.String(),
			"--group", "root", "--pin-path", g.pin, "--no-lockout-check", "--confirm-within", "3s")
		cmd.Env = env
		var out bytes.Buffer
		stdout, _ := cmd.StdoutPipe()
		cmd.Stderr = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if !strings.Contains(line, "aegis-loader confirm") {
			t.Fatalf("%q\n%s", line, out.String())
		}
		if code, o := g.try(loaderEnv(), "confirm"); code != 0 || !strings.Contains(o, "confirmed") {
			t.Fatalf("confirm: exit %d\n%s", code, o)
		}
		rest, _ := io.ReadAll(stdout)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("load: %v\n%s%s\n%s", err, line, rest, out.String())
		}
		time.Sleep(4 * time.Second) // past the deadline
		if !g.xdp().Attached {
			t.Fatal("the confirmed filter was removed")
		}
		if err := op.echo("confirmed", 2*time.Second); err == nil {
			t.Fatal("the confirmed filter does not enforce")
		}
		if code, o := g.try(loaderEnv(), "confirm"); code == 0 || !strings.Contains(o, "no load is waiting") {
			t.Fatalf("second confirm: exit %d\n%s", code, o)
		}
		if _, err := os.Stat(state.LinkPath(g.pin, tu.PublicIface)); err != nil {
			t.Fatal(err)
		}
		g.try(env, "unload")
	})
}
