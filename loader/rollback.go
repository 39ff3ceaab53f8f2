package loader

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Confirm-or-rollback, as iptables-apply does it: "load --confirm-within
// D" takes a snapshot of what is installed, loads, and hands the snapshot
// to a detached child of its own (a new session: no controlling terminal,
// no SIGHUP when the SSH connection drops, stdio on /dev/null) that waits
// for "aegis-loader confirm" and restores the snapshot if none comes in
// time. The child, not a transient systemd unit, because the snapshot
// includes the previous program, which nothing pins once the load
// replaced it: the child holds it as an open file descriptor, inherited
// from the loader, and works the same with or without systemd.
//
// The handshake is a file per pin path in RuntimeDir, decided by atomic
// renames so that a confirm racing the deadline has one winner:
//
//	NAME.pending    the child waits; confirm removes it (confirmed)
//	NAME.expired    the deadline won: the child renamed pending, restores
//	NAME.rolledback the child's outcome, read (and removed) by the loader
//
// The child dies with its cgroup: where logind kills a session's processes
// on logout (KillUserProcesses=yes), start the load in a scope of its own
// ("systemd-run --scope aegis-loader load --confirm-within 60s ...").

// RuntimeDir holds the confirm-or-rollback handshake files.
const RuntimeDir = "/run/aegis"

// ErrRolledBack means a load was not confirmed in time and the previous
// state was restored.
var ErrRolledBack = errors.New("not confirmed in time: rolled back")

// ErrNothingToConfirm means no load waits for a confirmation.
var ErrNothingToConfirm = errors.New("no load is waiting for confirmation")

// snapshot is what a rollback restores.
type snapshot struct {
	PinPath string `json:"pin_path"`
	// Existed: the pin directory was there. If not, a rollback removes
	// everything the load created.
	Existed bool `json:"existed"`
	// Links are the interfaces that had a pinned link.
	Links []string `json:"links"`
	// Program is the id of the pinned program (0: none); the child holds
	// it open as file descriptor 3.
	Program uint32                            `json:"program"`
	Config  *state.Config                     `json:"config,omitempty"`
	AllowV4 []allowEntry[bpf.AegisAllowKeyV4] `json:"allow_v4,omitempty"`
	AllowV6 []allowEntry[bpf.AegisAllowKeyV6] `json:"allow_v6,omitempty"`
	// Configured is the recorded set of configured interfaces (nil when
	// there was none), which the watcher keeps filtered.
	Configured []state.Interface `json:"configured,omitempty"`
	Deadline   time.Time         `json:"deadline"`
}

type allowEntry[K any] struct {
	Key   K                   `json:"key"`
	Value bpf.AegisAllowValue `json:"value"`
}

// handshake returns the path of the handshake file of pinPath in state s.
func handshake(pinPath, s string) string {
	name := strings.ReplaceAll(strings.Trim(filepath.Clean(pinPath), "/"), "/", "-")
	return filepath.Join(RuntimeDir, "confirm-"+name+"."+s)
}

// takeSnapshot records the installed state of pinPath and opens its
// program, which the caller must close.
func takeSnapshot(pinPath string) (*snapshot, *ebpf.Program, error) {
	s := &snapshot{PinPath: pinPath}
	if _, err := os.Lstat(pinPath); errors.Is(err, fs.ErrNotExist) {
		return s, nil, nil
	}
	s.Existed = true
	var err error
	if s.Links, err = state.LinkedInterfaces(pinPath); err != nil {
		return nil, nil, err
	}
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	if m, err := ebpf.LoadPinnedMap(state.MapPath(pinPath, state.MapConfig), ro); err == nil {
		if v, err := state.ReadLayoutVersion(m); err == nil && v == bpf.LayoutVersion {
			c, err := (&state.Maps{Config: m}).ReadConfig()
			if err == nil {
				s.Config = &c
			}
		}
		m.Close()
	}
	if a4, err := ebpf.LoadPinnedMap(state.MapPath(pinPath, state.MapAllowV4), ro); err == nil {
		defer a4.Close()
		if a6, err := ebpf.LoadPinnedMap(state.MapPath(pinPath, state.MapAllowV6), ro); err == nil {
			defer a6.Close()
			e, err := readAllowEntries(a4, a6)
			if err != nil {
				return nil, nil, err
			}
			for k, v := range e.V4 {
				s.AllowV4 = append(s.AllowV4, allowEntry[bpf.AegisAllowKeyV4]{k, v})
			}
			for k, v := range e.V6 {
				s.AllowV6 = append(s.AllowV6, allowEntry[bpf.AegisAllowKeyV6]{k, v})
			}
		}
	}
	if ifs, err := state.ReadInterfaces(pinPath); err == nil {
		s.Configured = ifs
	}
	prog, err := ebpf.LoadPinnedProgram(state.ProgramPath(pinPath), nil)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open pinned program: %w", err)
	}
	id, err := programID(prog)
	if err != nil {
		prog.Close()
		return nil, nil, err
	}
	s.Program = uint32(id)
	return s, prog, nil
}

// LoadConfirmed loads cfg and rolls back to what was installed before
// unless Confirm is called within d. The waiting and the rollback are done
// by a detached child (exe, run with args), which outlives this process
// and the operator's session. It returns the load's result, and once the
// outcome is known, nil (confirmed) or an error wrapping ErrRolledBack.
// wait is called once the child waits, to tell the operator.
func (l *Loader) LoadConfirmed(cfg Config, d time.Duration, exe string, args []string, wait func(*Result, string)) (*Result, error) {
	if err := checkRuntimeDir(); err != nil {
		return nil, err
	}
	pending := handshake(cfg.PinPath, "pending")
	if _, err := os.Stat(pending); err == nil {
		return nil, fmt.Errorf("%w: another load of %s waits for confirmation (%s): run \"aegis-loader confirm\" first, or wait for its rollback",
			ErrInvalid, cfg.PinPath, pending)
	}
	_ = os.Remove(handshake(cfg.PinPath, "rolledback"))
	snap, prog, err := takeSnapshot(cfg.PinPath)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", cfg.PinPath, err)
	}
	if prog != nil {
		defer prog.Close()
	}
	res, err := l.Load(cfg)
	if err != nil {
		return res, err
	}
	if !res.Changed() {
		return res, nil // nothing to roll back
	}
	snap.Deadline = time.Now().Add(d)
	b, err := json.Marshal(snap)
	if err != nil {
		return res, err
	}
	if err := os.WriteFile(pending, b, 0o600); err != nil {
		return res, fmt.Errorf("write %s: %w", pending, err)
	}
	logPath := handshake(cfg.PinPath, "log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		_ = os.Remove(pending)
		return res, fmt.Errorf("open %s: %w", logPath, err)
	}
	defer logf.Close()
	cmd := exec.Command(exe, append(args, "--pin-path", cfg.PinPath)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if prog != nil {
		cmd.ExtraFiles = []*os.File{os.NewFile(uintptr(prog.FD()), "program")}
	}
	if err := cmd.Start(); err != nil {
		_ = os.Remove(pending)
		return res, fmt.Errorf("start the rollback timer: %w", err)
	}
	pid := cmd.Process.Pid
	_ = cmd.Process.Release()
	l.Log.Info().Int("pid", pid).Stringer("deadline", d).Str("file", pending).
		Msg("waiting for \"aegis-loader confirm\"; the previous state comes back otherwise")
	if wait != nil {
		wait(res, logPath)
	}
	// The child reports within moments of the deadline; past this bound it
	// died (killed, or the machine is shutting down) and rolled nothing back.
	giveUp := snap.Deadline.Add(time.Minute)
	for {
		time.Sleep(100 * time.Millisecond)
		if time.Now().After(giveUp) {
			return res, fmt.Errorf("the rollback timer (pid %d) did not report by %s: see %s; the load stays as it is unless it rolled back",
				pid, giveUp.Format(time.TimeOnly), logPath)
		}
		if _, err := os.Stat(pending); err == nil {
			continue
		}
		if b, err := os.ReadFile(handshake(cfg.PinPath, "rolledback")); err == nil {
			_ = os.Remove(handshake(cfg.PinPath, "rolledback"))
			return res, fmt.Errorf("%w: %s", ErrRolledBack, strings.TrimSpace(string(b)))
		}
		if _, err := os.Stat(handshake(cfg.PinPath, "expired")); err == nil {
			continue // the rollback runs
		}
		return res, nil
	}
}

// checkRuntimeDir creates RuntimeDir 0700 root, or checks that it is
// root's alone: whoever could write in it could hand the rollback a forged
// snapshot, allow rules included.
func checkRuntimeDir() error {
	if err := os.Mkdir(RuntimeDir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", RuntimeDir, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(RuntimeDir, &st); err != nil {
		return fmt.Errorf("stat %s: %w", RuntimeDir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Uid != 0 || st.Mode&0o022 != 0 {
		return fmt.Errorf("%w: %s must be a directory of root's that only root may write (\"chown root: %s; chmod 0700 %s\"): the rollback trusts what it holds",
			ErrUnsafePinPath, RuntimeDir, RuntimeDir, RuntimeDir)
	}
	return nil
}

// Confirm keeps the load waiting for confirmation of pinPath. Returns
// ErrNothingToConfirm if none waits (it was confirmed or rolled back).
func Confirm(pinPath string) error {
	err := os.Remove(handshake(pinPath, "pending"))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w for %s (already confirmed, or rolled back)", ErrNothingToConfirm, pinPath)
	}
	return err
}

// WaitAndRollback is the detached child's job: it waits for the
// confirmation of pinPath's pending load and restores the snapshot when
// the deadline passes first. prog is the previous program (nil if none).
func (l *Loader) WaitAndRollback(pinPath string, prog *ebpf.Program) error {
	pending := handshake(pinPath, "pending")
	b, err := os.ReadFile(pending)
	if err != nil {
		return fmt.Errorf("read %s: %w", pending, err)
	}
	var snap snapshot
	if err := json.Unmarshal(b, &snap); err != nil {
		return fmt.Errorf("read %s: %w", pending, err)
	}
	for time.Now().Before(snap.Deadline) {
		if _, err := os.Stat(pending); errors.Is(err, fs.ErrNotExist) {
			l.Log.Info().Str("pin_path", pinPath).Msg("confirmed")
			return nil
		}
		time.Sleep(min(100*time.Millisecond, time.Until(snap.Deadline)))
	}
	expired := handshake(pinPath, "expired")
	if err := os.Rename(pending, expired); errors.Is(err, fs.ErrNotExist) {
		l.Log.Info().Str("pin_path", pinPath).Msg("confirmed")
		return nil
	} else if err != nil {
		return fmt.Errorf("claim %s: %w", pending, err)
	}
	outcome := "restored the previous state"
	rerr := l.restore(&snap, prog)
	if rerr != nil {
		outcome = "rollback failed: " + rerr.Error()
		l.Log.Error().Err(rerr).Str("pin_path", pinPath).Msg("rollback failed")
	} else {
		l.Log.Warn().Str("pin_path", pinPath).Msg("not confirmed in time: restored the previous state")
	}
	if err := os.WriteFile(expired, []byte(outcome+"\n"), 0o600); err == nil {
		_ = os.Rename(expired, handshake(pinPath, "rolledback"))
	}
	return rerr
}

// restore brings the pins back to snap: everything removed if there was
// nothing, else the interfaces attached before, their program, the config
// and the allow rules. The sessions maps are kept (sessions granted
// meanwhile stay).
func (l *Loader) restore(snap *snapshot, prog *ebpf.Program) error {
	if !snap.Existed {
		_, err := l.Unload(snap.PinPath, nil)
		if errors.Is(err, ErrNotLoadedHere) {
			return nil
		}
		return err
	}
	now, err := state.LinkedInterfaces(snap.PinPath)
	if err != nil {
		return err
	}
	var added []string
	for _, name := range now {
		if !slices.Contains(snap.Links, name) {
			added = append(added, name)
		}
	}
	if len(added) > 0 {
		if _, err := l.Unload(snap.PinPath, added); err != nil {
			return err
		}
	}

	pd, err := lockPinDir(snap.PinPath, 0, false, l.lockNotice(snap.PinPath))
	if err != nil {
		return err
	}
	defer pd.Unlock()
	if prog != nil {
		if err := l.restoreProgram(snap, prog); err != nil {
			return err
		}
	}
	if err := restoreConfigured(snap); err != nil {
		return err
	}
	if snap.Config == nil {
		return nil
	}
	maps := &state.Maps{PinPath: snap.PinPath}
	for _, name := range []string{state.MapConfig, state.MapAllowV4, state.MapAllowV6} {
		m, err := ebpf.LoadPinnedMap(state.MapPath(snap.PinPath, name), nil)
		if err != nil {
			maps.Close()
			return fmt.Errorf("open %s: %w", name, err)
		}
		maps.Set(name, m)
	}
	defer maps.Close()
	allow := state.AllowEntries{V4: map[bpf.AegisAllowKeyV4]bpf.AegisAllowValue{}, V6: map[bpf.AegisAllowKeyV6]bpf.AegisAllowValue{}}
	for _, e := range snap.AllowV4 {
		allow.V4[e.Key] = e.Value
	}
	for _, e := range snap.AllowV6 {
		allow.V6[e.Key] = e.Value
	}
	_, err = writeRulesAndConfig(maps, allow, *snap.Config, &Result{})
	return err
}

// restoreConfigured puts the recorded set of configured interfaces back as
// it was, so that the watcher keeps what was filtered before filtered and
// leaves alone what this load added.
func restoreConfigured(snap *snapshot) error {
	if snap.Configured == nil {
		return nil
	}
	set, err := state.OpenInterfaces(snap.PinPath, true)
	if err != nil {
		return fmt.Errorf("restore the configured interfaces: %w", err)
	}
	defer set.Close()
	now, err := set.List()
	if err != nil {
		return err
	}
	for _, i := range now {
		if !slices.ContainsFunc(snap.Configured, func(c state.Interface) bool { return c.Name == i.Name }) {
			if err := set.Delete(i.Name); err != nil {
				return err
			}
		}
	}
	for _, i := range snap.Configured {
		if err := set.Put(i); err != nil {
			return err
		}
	}
	return nil
}

// restoreProgram moves every link back to the previous program and pins
// it again, as an upgrade does in reverse.
func (l *Loader) restoreProgram(snap *snapshot, prog *ebpf.Program) error {
	linked, err := state.LinkedInterfaces(snap.PinPath)
	if err != nil {
		return err
	}
	for _, name := range linked {
		lk, err := link.LoadPinnedLink(state.LinkPath(snap.PinPath, name), nil)
		if err != nil {
			return fmt.Errorf("open pinned link of %s: %w", name, err)
		}
		info, err := lk.Info()
		if err == nil && uint32(info.Program) != snap.Program {
			err = l.Update(lk, prog)
			if err == nil {
				l.Log.Info().Str("iface", name).Uint32("program", snap.Program).Msg("restored the previous program")
			}
		}
		lk.Close()
		if err != nil {
			return fmt.Errorf("restore the program of %s: %w", name, err)
		}
	}
	next, path := state.ProgramNextPath(snap.PinPath), state.ProgramPath(snap.PinPath)
	_ = os.Remove(next)
	if err := prog.Pin(next); err != nil {
		return fmt.Errorf("pin program %s: %w", next, err)
	}
	_ = os.Chmod(next, 0o600)
	if err := os.Rename(next, path); err != nil {
		return fmt.Errorf("replace program pin %s: %w", path, err)
	}
	return nil
}
