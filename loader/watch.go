package loader

// aegis-loader watch keeps "every configured interface is filtered whenever
// it exists" true between loads.
//
// The kernel detaches an XDP bpf_link when its device is unregistered: a
// driver reload, a hotplugged NIC, networkd re-creating a VLAN or a bond.
// A device created again under the same name has no program, and the pin
// still there looks healthy to anyone who only checks that it exists. The
// watcher subscribes to rtnetlink link events and, for a configured
// interface that is not operator-detached and not filtered (state.Judge),
// attaches the pinned program through a new bpf_link with the recorded
// mode and renames its pin over the stale one. No verifier run: the
// program is already loaded and pinned.
//
// Why netlink, not udev or a systemd device unit: udev does not run in
// containers (where gateways are often tested and sometimes deployed), a
// device unit starts a process per event, tens of milliseconds after the
// kernel announced the device, and neither sees a rename onto a configured
// name as an event of that name. The RTM_NEWLINK of a new device arrives
// while it is still down; attaching on that event closes the gap before
// the device can carry a packet in most cases, not after.
//
// Races. Repairs take the pin directory's exclusive flock, the one the
// loader holds for a whole load or unload, so a repair never interleaves
// with them; each repair observes again under the lock, so an event that
// a load already handled is a no-op. A device removed between the
// observation and the attach fails the attach (logged, next event or
// resync retries). Events lost to a netlink overrun (ENOBUFS) end the
// subscription; the watcher subscribes again, listing existing links, and
// resyncs every configured interface. A periodic resync is the safety net
// for anything else (a link detached by hand, say).
//
// The gap. The attach syscall takes ~10 ms (RCU), and the watcher may be
// scheduled late, so a re-created device brought up at once could carry
// packets before the filter is back. The nftables guard (internal/guard)
// covers that gap without depending on the watcher's speed: it drops IP
// traffic of every configured name unless it arrives on an ifindex that
// was filtered when the guard was last written. The watcher rewrites the
// guard before its first repair (at start and every resync) and after
// every event of a configured name; a repair therefore exempts the new
// device only after netlink reports our program on it. On SIGTERM the
// guard stays: fail closed.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
)

// Watcher restores the filter on configured interfaces. Create it with
// NewWatcher.
type Watcher struct {
	l       *Loader
	pinPath string
	resync  time.Duration
	// Event queue between the netlink receiver and the loop, and the
	// socket's receive buffer; tests shrink them to force an overrun.
	queue, rcvbuf int

	lastLoop atomic.Int64 // unix nanoseconds the event loop last ran
	// Owned by the event loop: the last reported problem per interface,
	// so that a persistent one is logged once, not every resync.
	reported map[string]string
	status   string

	// repaired counts attaches, for tests.
	mu       sync.Mutex
	repaired int
}

// NewWatcher returns a watcher of the pins under pinPath that resyncs
// every resync.
func (l *Loader) NewWatcher(pinPath string, resync time.Duration) *Watcher {
	return &Watcher{l: l, pinPath: pinPath, resync: resync, reported: map[string]string{},
		// Large enough that bursts (a bond with many slaves coming back)
		// rarely overrun; an overrun only costs a resync.
		queue: 4096, rcvbuf: 1 << 20}
}

// Run watches until ctx ends. It reports readiness to systemd once it is
// subscribed and has resynced once.
func (w *Watcher) Run(ctx context.Context) error {
	w.lastLoop.Store(time.Now().UnixNano())
	ready, cause := false, "start"
	for ctx.Err() == nil {
		updates := make(chan netlink.LinkUpdate, w.queue)
		done := make(chan struct{})
		var closing atomic.Bool
		err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
			ListExisting:      true,
			ReceiveBufferSize: w.rcvbuf,
			ErrorCallback: func(err error) {
				if !closing.Load() {
					w.l.Log.Warn().Err(err).Msg("netlink link events")
				}
			},
		})
		if err != nil {
			close(done)
			return fmt.Errorf("subscribe to netlink link events: %w", err)
		}
		w.resyncAll(cause)
		if !ready {
			daemon.Ready(w.l.Log)
			w.l.Log.Info().Str("pin_path", w.pinPath).Stringer("resync", w.resync).Msg("watching configured interfaces")
			go daemon.Watchdog(ctx, w.l.Log, w.healthy)
			ready = true
		}
		w.loop(ctx, updates)
		closing.Store(true)
		close(done)
		for range updates { // until the receiving goroutine has stopped
		}
		if ctx.Err() == nil {
			// An overrun (ENOBUFS) or a receive error ends the
			// subscription: events were lost, so resync.
			w.l.Log.Warn().Msg("netlink subscription ended; subscribing again and resyncing")
			cause = "resubscribe"
			// A receive error that persists must not spin.
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	daemon.Stopping(w.l.Log)
	w.l.Log.Info().Msg("watcher stopped")
	return nil
}

// loop handles events until ctx ends or the subscription does.
func (w *Watcher) loop(ctx context.Context, updates <-chan netlink.LinkUpdate) {
	tick := time.NewTicker(w.resync)
	defer tick.Stop()
	for {
		w.lastLoop.Store(time.Now().UnixNano())
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			w.resyncAll("resync")
		case u, ok := <-updates:
			if !ok {
				return
			}
			seen := time.Now()
			if u.Link == nil || (u.Header.Type != unix.RTM_NEWLINK && u.Header.Type != unix.RTM_DELLINK) {
				continue
			}
			// A deleted device cannot be repaired, but its ifindex
			// leaves the guard's exemptions (repairIfConfigured syncs
			// the guard after every event of a configured name).
			w.repairIfConfigured(u.Link.Attrs().Name, seen, "netlink")
		}
	}
}

func (w *Watcher) healthy() error {
	age := time.Since(time.Unix(0, w.lastLoop.Load()))
	if limit := 3*w.resync + 10*time.Second; age > limit {
		return fmt.Errorf("event loop last ran %v ago", age.Round(time.Second))
	}
	return nil
}

// Repairs is the number of attaches the watcher made.
func (w *Watcher) Repairs() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.repaired
}

// repairIfConfigured repairs name if it is configured. Events of every
// other interface cost one map lookup.
func (w *Watcher) repairIfConfigured(name string, seen time.Time, cause string) {
	records, err := state.OpenInterfaces(w.pinPath, false)
	if err != nil {
		return // nothing loaded (yet): the resync reports it
	}
	_, ok, err := records.Get(name)
	records.Close()
	if err != nil || !ok {
		return
	}
	if _, err := w.repair(name, seen, cause); err != nil {
		w.report(name, err.Error(), func(e *zerolog.Event) *zerolog.Event { return e.Err(err) })
	}
	w.syncGuard()
	w.updateStatus()
}

// resyncAll repairs every configured interface and updates the systemd
// status line.
func (w *Watcher) resyncAll(cause string) {
	records, err := state.OpenInterfaces(w.pinPath, false)
	var list []state.Interface
	if err == nil {
		list, err = records.List()
		records.Close()
	}
	if err != nil {
		w.setStatus("waiting for aegis-loader load: " + err.Error())
		return
	}
	// Guard first: at start, every configured interface that is not
	// filtered is dropped before the first (slow) attach.
	w.syncGuard()
	for _, r := range list {
		if _, err := w.repair(r.Name, time.Now(), cause); err != nil {
			w.report(r.Name, err.Error(), func(e *zerolog.Event) *zerolog.Event { return e.Err(err) })
		}
	}
	w.syncGuard()
	w.updateStatus()
}

// syncGuard rewrites the guard under the pin directory's lock: after a
// repair it exempts the device only once netlink reports our program on
// it; after a deletion it withdraws the old device's exemption.
func (w *Watcher) syncGuard() {
	lock, err := lockPinDir(w.pinPath, 0, false)
	if err != nil {
		return // unloaded (or never loaded): unload removed the guard
	}
	defer lock.Unlock()
	w.l.syncGuard(w.pinPath)
}

// updateStatus sets the systemd status line to the configured interfaces'
// state.
func (w *Watcher) updateStatus() {
	verdicts, problem := state.NotFiltered(w.pinPath)
	if problem != "" {
		if g := guardStatus(w.pinPath, verdicts); len(g.Dropping) > 0 {
			problem += "; guard dropping " + strings.Join(g.Dropping, ",")
		}
		w.setStatus("NOT FILTERED: " + problem)
	} else {
		w.setStatus(fmt.Sprintf("%d configured interface(s), all filtered", len(verdicts)))
	}
}

func (w *Watcher) setStatus(s string) {
	if s != w.status {
		daemon.Status(s)
		w.status = s
	}
}

// report logs a persistent problem of one interface once per change.
func (w *Watcher) report(name, problem string, fields func(*zerolog.Event) *zerolog.Event) {
	if w.reported[name] == problem {
		return
	}
	w.reported[name] = problem
	if problem == "" {
		return
	}
	fields(w.l.Log.Warn().Str("iface", name)).Msg("configured interface not filtered; cannot repair it now")
}

// errNotRepairable marks an unfiltered interface the watcher must leave
// alone (a foreign program) or cannot attach yet (no device).
var errNotRepairable = errors.New("not repairable")

// repair re-attaches name if it is configured, not operator-detached and
// not filtered. It reports whether it attached.
func (w *Watcher) repair(name string, seen time.Time, cause string) (bool, error) {
	lock, err := lockPinDir(w.pinPath, 0, false)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil // unloaded meanwhile
	}
	if err != nil {
		return false, err
	}
	defer lock.Unlock()
	records, err := state.OpenInterfaces(w.pinPath, true)
	if err != nil {
		return false, err
	}
	defer records.Close()
	rec, ok, err := records.Get(name)
	if err != nil || !ok {
		return false, err
	}
	o, err := state.Observe(w.pinPath, rec)
	if err != nil {
		return false, err
	}
	v := state.Judge(o)
	switch v.Reason {
	case "":
		w.reported[name] = ""
		return false, nil
	case state.UnfilteredOperatorDetached, state.UnfilteredNoDevice:
		w.reported[name] = ""
		return false, nil // the operator's choice; nothing to attach to
	case state.UnfilteredForeignProgram:
		return false, fmt.Errorf("%w: %s: %s: detach it (\"ip link set dev %s xdp off\") and the watcher attaches ours",
			errNotRepairable, v.Reason, v.Detail, name)
	}

	prog, err := ebpf.LoadPinnedProgram(state.MapPath(w.pinPath, state.ProgramPin), nil)
	if err != nil {
		return false, fmt.Errorf("open pinned program: %w", err)
	}
	defer prog.Close()
	progID, err := programID(prog)
	if err != nil {
		return false, err
	}
	rec.Ifindex, rec.ProgramID = o.Device.Ifindex, progID
	if err := w.l.attach(prog, name, o.Device.Ifindex, rec.Mode, w.pinPath, func() error { return records.Put(rec) }); err != nil {
		return false, err
	}
	// The reply path's egress link went with the device too. Failing to
	// restore it drops replies, not filtering: the interface is filtered
	// now, so the repair stands and the failure is logged.
	if _, err := w.l.reattachEgress(w.pinPath, name, o.Device.Ifindex); err != nil {
		w.l.Log.Error().Err(err).Str("iface", name).
			Msg("re-attached XDP but not the reply path's egress program; replies to outbound connections drop until \"aegis-loader load\" runs")
	}
	took := time.Since(seen)
	w.reported[name] = ""
	w.mu.Lock()
	w.repaired++
	w.mu.Unlock()
	w.l.Log.Info().Str("iface", name).Int("ifindex", o.Device.Ifindex).Str("mode", string(rec.Mode)).
		Str("was", string(v.Reason)).Str("cause", cause).
		Float64("event_to_attach_ms", float64(took.Microseconds())/1000).
		Msg("re-attached XDP program")
	return true, nil
}
