package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"iter"
	"os"
	"sync"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
)

// OpenOptions says what a process intends to do with the maps.
type OpenOptions struct {
	// Writable opens the sessions maps for writing (grants, revokes,
	// reaping). Everything else is always opened read-only: only the loader
	// writes the config and the allow rules.
	Writable bool
}

// Maps is an open handle on the pinned maps.
type Maps struct {
	PinPath    string
	SessionsV4 *ebpf.Map
	SessionsV6 *ebpf.Map
	AllowV4    *ebpf.Map
	AllowV6    *ebpf.Map
	Config     *ebpf.Map
	Stats      *ebpf.Map
	// SweepSeq is the sweep sequence that every session write reads
	// before and after writing (see sweep.go).
	SweepSeq *ebpf.Map
	// FlowsV4 and FlowsV6 are the outbound flows whose replies pass;
	// Frags the datagrams whose first fragment passed. The data path
	// writes them; user space only reads them.
	FlowsV4 *ebpf.Map
	FlowsV6 *ebpf.Map
	Frags   *ebpf.Map
	// Ifaces records the interfaces the loader was told to filter
	// (ifaces.go).
	Ifaces *ebpf.Map
	// Events is the ring buffer of verdict events, EventLimits its per-CPU
	// rate limiters (events.go).
	Events      *ebpf.Map
	EventLimits *ebpf.Map
	// AllowHits counts the packets each allow rule admitted (allowhits.go).
	AllowHits *ebpf.Map
	// TombsV4 and TombsV6 hold the tombstones of removed sessions
	// (tomb.go).
	TombsV4 *ebpf.Map
	TombsV6 *ebpf.Map
	// PortMarks marks the ports sessions and flows are at (marks.go).
	PortMarks *ebpf.Map

	stats guardStats
	marks markCache
	// unguardedTombs, set by tests, writes tombstones without the sweep
	// sequence check, to show what the check prevents.
	unguardedTombs bool
}

var (
	specOnce sync.Once
	specVal  *ebpf.CollectionSpec
	specErr  error
)

// Spec returns the data path's collection spec as compiled into this
// binary. Callers must not modify it; use Copy.
func Spec() (*ebpf.CollectionSpec, error) {
	specOnce.Do(func() { specVal, specErr = bpf.Spec() })
	return specVal, specErr
}

// Open opens the maps pinned under pinPath. It holds the pin directory's
// lock shared while it opens them, so it never sees a loader's half-done
// work.
//
// Returns ErrNotLoaded if the directory or a map is missing or is not the
// loader's (a symlink, or not owned by root), ErrPermission if the caller
// may not open them, and ErrIncompatible if a map's layout is not this
// build's.
func Open(pinPath string, opts OpenOptions) (*Maps, error) {
	if err := checkRootsPin(pinPath); err != nil {
		return nil, err
	}
	lock, err := LockDir(pinPath, false)
	if err != nil {
		return nil, openError(pinPath, err)
	}
	defer lock.Unlock()

	spec, err := Spec()
	if err != nil {
		return nil, fmt.Errorf("load embedded data path: %w", err)
	}

	m := &Maps{PinPath: pinPath}
	for _, t := range m.slots() {
		path := MapPath(pinPath, t.name)
		if err := checkRootsPin(path); err != nil {
			m.Close()
			return nil, err
		}
		mp, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: !(opts.Writable && DaemonWritable(t.name))})
		if err != nil {
			m.Close()
			return nil, openError(path, err)
		}
		*t.p = mp
		if err := CheckLayout(spec.Maps[t.name], mp); err != nil {
			m.Close()
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
	}
	v, err := ReadLayoutVersion(m.Config)
	if err != nil {
		m.Close()
		return nil, err
	}
	switch v {
	case bpf.LayoutVersion:
		return m, nil
	case 0:
		m.Close()
		return nil, fmt.Errorf("%s: %w: the loader has not written the config yet; run aegis-loader load", pinPath, ErrNotLoaded)
	default:
		m.Close()
		return nil, fmt.Errorf("%s: %w: maps have layout version %d, this build speaks version %d: run binaries of one release",
			pinPath, ErrIncompatible, v, bpf.LayoutVersion)
	}
}

// checkRootsPin refuses a pin or pin directory that the loader, running as
// root and refusing symlinks, cannot have made: another user's map would
// take the grants. A missing one is left for the open to report.
func checkRootsPin(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("open %s: %w: it is a symbolic link, not the loader's pins", path, ErrNotLoaded)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 {
		return fmt.Errorf("open %s: %w: it is owned by uid %d, not root, so not the loader's pins", path, ErrNotLoaded, st.Uid)
	}
	return nil
}

func openError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("open %s: %w: run aegis-loader load first", path, ErrNotLoaded)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, unix.EPERM):
		return fmt.Errorf("open %s: %w: the process needs CAP_BPF and membership of the pins' group (aegis)", path, ErrPermission)
	}
	return fmt.Errorf("open %s: %w", path, err)
}

// CheckLayout returns an error wrapping ErrIncompatible unless m has the map
// type, key and value sizes and flags of spec. Capacity may differ: it is
// the operator's choice (aegis-loader --max-sessions).
func CheckLayout(spec *ebpf.MapSpec, m *ebpf.Map) error {
	s := spec.Copy()
	s.MaxEntries = m.MaxEntries()
	if err := s.Compatible(m); err != nil {
		return fmt.Errorf("%w: %v", ErrIncompatible, err)
	}
	return nil
}

// DaemonWritable reports whether the daemons write the named map: the
// sessions maps and their tombstones, the reaper's sweep counter (see
// sweep.go) and the port marks of the sessions (marks.go). The loader
// alone writes the config and the allow rules. The events ring buffer is
// here because reading one needs a writable descriptor: the reader
// advances the consumer position in a page the kernel maps writable only
// for one. That lets group aegis skip events, and nothing else (user space
// cannot write into a BPF_MAP_TYPE_RINGBUF).
func DaemonWritable(name string) bool {
	return name == MapSessionsV4 || name == MapSessionsV6 || name == MapSweepSeq || name == MapEvents ||
		name == MapTombsV4 || name == MapTombsV6 || name == MapPortMarks
}

type slot struct {
	name string
	p    **ebpf.Map
}

// slots lists the set's maps with their pin names, in MapNames order.
func (m *Maps) slots() []slot {
	return []slot{
		{MapSessionsV4, &m.SessionsV4}, {MapSessionsV6, &m.SessionsV6},
		{MapAllowV4, &m.AllowV4}, {MapAllowV6, &m.AllowV6},
		{MapConfig, &m.Config}, {MapStats, &m.Stats},
		{MapSweepSeq, &m.SweepSeq},
		{MapFlowsV4, &m.FlowsV4}, {MapFlowsV6, &m.FlowsV6}, {MapFrags, &m.Frags},
		{MapIfaces, &m.Ifaces},
		{MapEvents, &m.Events}, {MapEventLimits, &m.EventLimits},
		{MapAllowHits, &m.AllowHits},
		{MapTombsV4, &m.TombsV4}, {MapTombsV6, &m.TombsV6},
		{MapPortMarks, &m.PortMarks},
	}
}

// Set puts mp into the set under its pin name, for the loader, which opens
// or creates each map itself. It panics on a name not in MapNames.
func (m *Maps) Set(name string, mp *ebpf.Map) {
	for _, s := range m.slots() {
		if s.name == name {
			*s.p = mp
			if name == MapPortMarks {
				m.marks.reset()
			}
			return
		}
	}
	panic("state: no map named " + name)
}

// ByName returns the set's maps keyed by pin name, which is also the name
// the program refers to them by (ebpf.CollectionOptions.MapReplacements).
func (m *Maps) ByName() map[string]*ebpf.Map {
	out := make(map[string]*ebpf.Map, len(MapNames))
	for _, s := range m.slots() {
		if *s.p != nil {
			out[s.name] = *s.p
		}
	}
	return out
}

// Close releases the maps; the pins stay.
func (m *Maps) Close() error {
	var errs []error
	for _, s := range m.slots() {
		if *s.p != nil {
			errs = append(errs, (*s.p).Close())
		}
	}
	return errors.Join(errs...)
}

// Grant inserts or refreshes a session. A refresh replaces the timestamps,
// lifetime, idle timeout and user, and keeps the original creation time.
// When Grant returns nil the data path already passes the session's next
// packet. It is Upsert without the details.
//
// Returns ErrInvalid for a malformed session and ErrFull if the map is at
// capacity; in both cases the map is unchanged.
func (m *Maps) Grant(s Session) error {
	_, _, err := m.Upsert(s)
	return err
}

func updateError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.E2BIG):
		return ErrFull
	case errors.Is(err, unix.ENOMEM):
		return fmt.Errorf("%w: kernel out of memory for new sessions", ErrFull)
	}
	return fmt.Errorf("update session: %w", err)
}

// Revoke deletes a session, after writing its tombstone (tomb.go), so
// that its service cannot open a flow back to the user afterwards.
// Returns ErrNotFound if there is none. A revoke is never undone: a grant
// of the same key by this process runs before it or after it, and no
// sweep puts anything back.
//
// When the tombstone map is full, the session stays in the map, dead (the
// data path refuses it as expired at once), as its own tombstone; the
// reaper moves it once there is room. Revoke returns nil then too: the
// user is cut off either way.
func (m *Maps) Revoke(k Key) error {
	if err := k.Validate(); err != nil {
		return err
	}
	defer lockKey(k).Unlock()
	if !m.hasTombs() {
		return m.deleteSession(k)
	}
	v, err := m.lookupValue(k)
	if err != nil {
		return err
	}
	now := Now()
	tv := tombValue(TombRevoked, now)
	terr := m.putTomb(k, &tv)
	if terr == nil {
		return m.deleteSession(k)
	}
	// Fail closed: no tombstone, so the entry stays, dead.
	v.ExpiresNs = revokedMark
	switch err := m.update(k, &v, ebpf.UpdateExist); {
	case errors.Is(err, ebpf.ErrKeyNotExist):
		// The reaper deleted it meanwhile, having buried it first.
		return ErrNotFound
	case err != nil:
		return fmt.Errorf("revoke session %s: %w (and writing its tombstone failed: %v)", k, err, terr)
	}
	m.stats.keptDead.Add(1)
	return nil
}

// deleteSession deletes k's session. Returns ErrNotFound if there is none.
func (m *Maps) deleteSession(k Key) error {
	mp, kk := keyed(k, m.SessionsV4, m.SessionsV6)
	err := mp.Delete(kk)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("delete session: %w", err)
	}
	return nil
}

// lookupValue reads k's session value. Returns ErrNotFound if there is
// none.
func (m *Maps) lookupValue(k Key) (bpf.AegisSessionValue, error) {
	var v bpf.AegisSessionValue
	mp, kk := keyed(k, m.SessionsV4, m.SessionsV6)
	err := mp.Lookup(kk, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return v, ErrNotFound
	}
	if err != nil {
		return v, fmt.Errorf("lookup session: %w", err)
	}
	return v, nil
}

// Lookup returns one session. Returns ErrNotFound if there is none.
func (m *Maps) Lookup(k Key) (Session, error) {
	if err := k.Validate(); err != nil {
		return Session{}, err
	}
	v, err := m.lookupValue(k)
	if err != nil {
		return Session{}, err
	}
	return sessionFrom(k, &v), nil
}

// batchSize is the number of entries read per batch syscall when walking a
// sessions map. Large enough to amortize the syscall, small enough to keep
// the buffers (about 400 KiB for IPv6) cheap.
const batchSize = 4096

// Sessions iterates over every session, IPv4 first. It walks the maps with
// batch lookups, which resume at a bucket index, so concurrent inserts and
// deletes neither restart nor stop the walk; a session inserted or deleted
// meanwhile may or may not be seen.
func (m *Maps) Sessions() iter.Seq2[Session, error] {
	return func(yield func(Session, error) bool) {
		keys4 := make([]bpf.AegisSessionKeyV4, batchSize)
		vals := make([]bpf.AegisSessionValue, batchSize)
		ok := walk(m.SessionsV4, keys4, vals, func(k *bpf.AegisSessionKeyV4, v *bpf.AegisSessionValue) bool {
			return yield(sessionFrom(keyFromV4(k), v), nil)
		}, yield)
		if !ok {
			return
		}
		keys6 := make([]bpf.AegisSessionKeyV6, batchSize)
		walk(m.SessionsV6, keys6, vals, func(k *bpf.AegisSessionKeyV6, v *bpf.AegisSessionValue) bool {
			return yield(sessionFrom(keyFromV6(k), v), nil)
		}, yield)
	}
}

// walk batch-reads mp into keys and vals and calls fn for each entry. It
// returns false when fn or yield asked to stop.
func walk[K any](mp *ebpf.Map, keys []K, vals []bpf.AegisSessionValue,
	fn func(*K, *bpf.AegisSessionValue) bool, yield func(Session, error) bool) bool {
	err := eachBatch(mp, keys, vals, func(keys []K, vals []bpf.AegisSessionValue) bool {
		for i := range keys {
			if !fn(&keys[i], &vals[i]) {
				return false
			}
		}
		return true
	})
	if errors.Is(err, errStopped) {
		return false
	}
	if err != nil {
		return yield(Session{}, err)
	}
	return true
}

// errStopped is eachBatch's error when fn asked to stop.
var errStopped = errors.New("stopped")

// eachBatch reads mp with BPF_MAP_LOOKUP_BATCH into keys and vals, reused
// for every batch, and calls fn with each batch read, until the map is done
// or fn returns false (errStopped).
func eachBatch[K, V any](mp *ebpf.Map, keys []K, vals []V, fn func([]K, []V) bool) error {
	var cursor ebpf.MapBatchCursor
	for {
		n, err := mp.BatchLookup(&cursor, keys, vals, nil)
		if n > 0 && !fn(keys[:n], vals[:n]) {
			return errStopped
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", mp, err)
		}
	}
}

// eachValues is eachBatch for callers that need only the values, on
// either sessions map.
func eachValues(mp *ebpf.Map, fn func([]bpf.AegisSessionValue)) error {
	vals := make([]bpf.AegisSessionValue, batchSize)
	if mp.KeySize() == uint32(binary.Size(bpf.AegisSessionKeyV4{})) {
		return eachBatch(mp, make([]bpf.AegisSessionKeyV4, batchSize), vals,
			func(_ []bpf.AegisSessionKeyV4, v []bpf.AegisSessionValue) bool { fn(v); return true })
	}
	return eachBatch(mp, make([]bpf.AegisSessionKeyV6, batchSize), vals,
		func(_ []bpf.AegisSessionKeyV6, v []bpf.AegisSessionValue) bool { fn(v); return true })
}

// Count returns the number of sessions in each map.
func (m *Maps) Count() (v4, v6 int, err error) {
	if v4, err = CountEntries(m.SessionsV4); err != nil {
		return 0, 0, err
	}
	v6, err = CountEntries(m.SessionsV6)
	return v4, v6, err
}

// CountEntries counts the entries of a sessions map by batch-reading it.
func CountEntries(mp *ebpf.Map) (int, error) {
	total := 0
	err := eachValues(mp, func(v []bpf.AegisSessionValue) { total += len(v) })
	return total, err
}

// Counter is one verdict reason's packet and byte count, summed over CPUs.
type Counter struct {
	Packets uint64
	Bytes   uint64
}

// ReadStats sums the per-CPU stats map, indexed by Reason.
func ReadStats(stats *ebpf.Map) ([bpf.StatsSlots]Counter, error) {
	var out [bpf.StatsSlots]Counter
	var perCPU []bpf.AegisStatsValue
	for _, r := range bpf.Reasons {
		if err := stats.Lookup(uint32(r), &perCPU); err != nil {
			return out, fmt.Errorf("read stats: %w", err)
		}
		for _, c := range perCPU {
			out[r].Packets += c.Packets
			out[r].Bytes += c.Bytes
		}
	}
	return out, nil
}

// ReadStats sums the per-CPU stats map, indexed by Reason.
func (m *Maps) ReadStats() ([bpf.StatsSlots]Counter, error) { return ReadStats(m.Stats) }

// PinsPresent reports whether the pin directory holds a sessions map, for
// callers that only need to know whether the loader has run.
func PinsPresent(pinPath string) bool {
	_, err := os.Stat(MapPath(pinPath, MapSessionsV4))
	return err == nil
}
