package loader_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/loader"
)

// Layout 1, as the first release pinned it: the config value before it
// grew the flow-tracking fields, and no flow or fragment maps.
const configV1Size = 48

// A synthetic older layout of the IPv4 sessions map, for testing the
// framework on records: the value before it carried the user.
const sessionV1Size = 32

// oldPins pins what a release of layout version 1 would have left, with a
// session in an older sessions_v4 layout and counters in a stats map of
// fewer slots.
type oldPins struct {
	ids     map[string]ebpf.MapID
	key     bpf.AegisSessionKeyV4
	session [sessionV1Size]byte
}

func (e *env) pinLayoutV1(t *testing.T) *oldPins {
	t.Helper()
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(e.pin, 0o750); err != nil {
		t.Fatal(err)
	}
	op := &oldPins{ids: map[string]ebpf.MapID{}}
	pin := func(ms *ebpf.MapSpec, fill func(*ebpf.Map)) {
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		fill(m)
		if err := m.Pin(state.MapPath(e.pin, ms.Name)); err != nil {
			t.Fatal(err)
		}
		info, _ := m.Info()
		op.ids[ms.Name], _ = info.ID()
	}
	for _, name := range []string{state.MapSessionsV6, state.MapAllowV4, state.MapAllowV6} {
		pin(spec.Maps[name].Copy(), func(*ebpf.Map) {})
	}
	pin(&ebpf.MapSpec{Name: state.MapConfig, Type: ebpf.Array, KeySize: 4, ValueSize: configV1Size, MaxEntries: 1}, func(m *ebpf.Map) {
		v := make([]byte, configV1Size)
		binary.NativeEndian.PutUint32(v, 1)
		if err := m.Put(uint32(0), v); err != nil {
			t.Fatal(err)
		}
	})
	pin(&ebpf.MapSpec{Name: state.MapSessionsV4, Type: ebpf.Hash, KeySize: 12, ValueSize: sessionV1Size, MaxEntries: 262144, Flags: 1},
		func(m *ebpf.Map) {
			op.key = bpf.AegisSessionKeyV4{Src: [4]byte{192, 0, 2, 10}, Dst: [4]byte{198, 51, 100, 10}, Dport: 8080, Proto: 6}
			now := state.Now()
			binary.NativeEndian.PutUint64(op.session[0:], now)      // last seen
			binary.NativeEndian.PutUint64(op.session[8:], now-1000) // created
			binary.NativeEndian.PutUint64(op.session[24:], 3600e9)  // idle timeout
			if err := m.Put(&op.key, op.session[:]); err != nil {
				t.Fatal(err)
			}
		})
	stats := spec.Maps[state.MapStats].Copy()
	stats.MaxEntries = 16
	pin(stats, func(m *ebpf.Map) {
		perCPU := make([]bpf.AegisStatsValue, ebpf.MustPossibleCPU())
		perCPU[0] = bpf.AegisStatsValue{Packets: 7, Bytes: 700}
		if err := m.Put(uint32(bpf.ReasonSession), perCPU); err != nil {
			t.Fatal(err)
		}
	})
	return op
}

// convertSessionV1 adds the user field the synthetic older layout lacked.
func convertSessionV1(k, v []byte) ([]byte, []byte, bool, error) {
	if len(v) != sessionV1Size {
		return nil, nil, false, fmt.Errorf("value of %d bytes", len(v))
	}
	nv := make([]byte, binary.Size(bpf.AegisSessionValue{}))
	copy(nv, v)
	copy(nv[sessionV1Size:], "migrated")
	return k, nv, true, nil
}

func (e *env) mapID(name string) ebpf.MapID {
	e.t.Helper()
	m, err := ebpf.LoadPinnedMap(state.MapPath(e.pin, name), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Close()
	info, _ := m.Info()
	id, _ := info.ID()
	return id
}

func (e *env) noStagedPins() {
	e.t.Helper()
	for _, name := range state.MapNames {
		if _, err := os.Stat(state.MapNextPath(e.pin, name)); !os.IsNotExist(err) {
			e.t.Fatalf("staged pin of %s left behind: %v", name, err)
		}
	}
}

// Pins of an older layout are upgraded map by map: missing maps created,
// unchanged maps kept (same kernel object), changed maps migrated with
// their content; the config is rebuilt from the flags and announces the
// new version.
func TestUpgradeFromOlderLayout(t *testing.T) {
	e := newEnv(t)
	old := e.pinLayoutV1(t)
	loader.AddRecordMigration(t, 1, state.MapSessionsV4, convertSessionV1)
	loader.AddCounterMigration(t, 1, state.MapStats)

	r := e.mustLoad(nil, "--json")
	var res loader.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(res.MigratedMaps, ","), "sessions_v4,stats,config"; got != want {
		t.Errorf("migrated %s, want %s (config last)", got, want)
	}
	if got, want := strings.Join(res.CreatedMaps, ","), "sweep_seq,flows_v4,flows_v6,frags,ifaces,events,event_limits,allow_hits,tombs_v4,tombs_v6,port_marks"; got != want {
		t.Errorf("created %s, want %s", got, want)
	}
	for _, name := range []string{state.MapSessionsV6, state.MapAllowV4, state.MapAllowV6} {
		if id := e.mapID(name); id != old.ids[name] {
			t.Errorf("%s of an unchanged layout was replaced (map %d, was %d)", name, id, old.ids[name])
		}
	}
	for _, name := range res.MigratedMaps {
		if id := e.mapID(name); id == old.ids[name] {
			t.Errorf("%s still the old map %d", name, id)
		}
	}
	e.noStagedPins()

	if v, _, err := state.PinnedLayoutVersion(e.pin); err != nil || v != bpf.LayoutVersion {
		t.Fatalf("layout version %d (%v), want %d", v, err, bpf.LayoutVersion)
	}
	m := e.open() // the daemons' check of every map's layout
	var sv bpf.AegisSessionValue
	if err := m.SessionsV4.Lookup(&old.key, &sv); err != nil {
		t.Fatalf("session not carried over: %v", err)
	}
	var raw [sessionV1Size]byte
	binary.NativeEndian.PutUint64(raw[0:], sv.LastSeenNs)
	binary.NativeEndian.PutUint64(raw[8:], sv.CreatedNs)
	binary.NativeEndian.PutUint64(raw[16:], sv.ExpiresNs)
	binary.NativeEndian.PutUint64(raw[24:], sv.IdleTimeoutNs)
	user := make([]byte, len(sv.User))
	for i, c := range sv.User {
		user[i] = byte(c)
	}
	if raw != old.session || !bytes.HasPrefix(user, []byte("migrated\x00")) {
		t.Fatalf("session converted to %+v", sv)
	}
	stats, err := m.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	if c := stats[bpf.ReasonSession]; c.Packets != 7 || c.Bytes != 700 {
		t.Fatalf("session counter %+v, want 7 packets, 700 bytes carried over", c)
	}
	if int(m.Stats.MaxEntries()) != bpf.StatsSlots {
		t.Fatalf("stats has %d slots, want %d", m.Stats.MaxEntries(), bpf.StatsSlots)
	}
	cfg, err := m.ReadConfig()
	if err != nil || cfg.ControllerPort != 443 || cfg.FlowIdleUDP != state.DefaultFlowIdleUDP {
		t.Fatalf("config not rewritten from the flags: %+v %v", cfg, err)
	}
	if e.xdpProgram("a0") == 0 {
		t.Fatal("not attached")
	}

	if r := e.mustLoad(nil); !strings.Contains(r.stdout, "already loaded") {
		t.Fatalf("second load changed something: %q", r.stdout)
	}
}

// A failed upgrade leaves the old pins as they were, and the next load
// does the whole upgrade.
func TestFailedUpgradeKeepsOlderPins(t *testing.T) {
	e := newEnv(t)
	old := e.pinLayoutV1(t)
	loader.AddRecordMigration(t, 1, state.MapSessionsV4, convertSessionV1)
	loader.AddCounterMigration(t, 1, state.MapStats)

	r := e.cli(func(l *loader.Loader) {
		l.Attach = func(link.XDPOptions) (link.Link, error) { return nil, errors.New("injected attach failure") }
	}, e.loadArgs()...)
	if r.code != 1 || !strings.Contains(r.stderr, "injected attach failure") {
		t.Fatalf("%+v", r)
	}
	for _, name := range []string{state.MapSessionsV4, state.MapStats, state.MapConfig} {
		if id := e.mapID(name); id != old.ids[name] {
			t.Errorf("%s replaced by a failed upgrade", name)
		}
	}
	e.noStagedPins()
	if v, _, _ := state.PinnedLayoutVersion(e.pin); v != 1 {
		t.Fatalf("failed upgrade left layout version %d", v)
	}

	e.mustLoad(nil)
	if v, _, _ := state.PinnedLayoutVersion(e.pin); v != bpf.LayoutVersion {
		t.Fatalf("layout version %d after the retry", v)
	}
	var sv bpf.AegisSessionValue
	if err := e.open().SessionsV4.Lookup(&old.key, &sv); err != nil {
		t.Fatalf("session lost: %v", err)
	}
}

// A map whose layout changed and has no migration is refused, never
// recreated empty, and nothing is changed.
func TestUpgradeWithoutMigrationRefused(t *testing.T) {
	e := newEnv(t)
	old := e.pinLayoutV1(t)
	r := e.cli(nil, e.loadArgs()...)
	if r.code != 1 || !strings.Contains(r.stderr, "upgrade from layout version 1: no migration of map sessions_v4") {
		t.Fatalf("%+v", r)
	}
	for name, id := range old.ids {
		if e.mapID(name) != id {
			t.Errorf("%s replaced", name)
		}
	}
	e.noStagedPins()
	if e.xdpProgram("a0") != 0 {
		t.Fatal("attached over pins it could not upgrade")
	}
}

// Status names the pins' layout version and says when an older release
// made them.
func TestStatusOfOlderPins(t *testing.T) {
	e := newEnv(t)
	e.pinLayoutV1(t)
	r := e.cli(nil, "status", "--pin-path", e.pin)
	if r.code != 0 || !strings.Contains(r.stdout, fmt.Sprintf("layout version  1: pins from an older release (this build writes %d)", bpf.LayoutVersion)) {
		t.Fatalf("%+v", r)
	}
}

// Grants and revokes that reach the old sessions map while an upgrade
// migrates it (the old daemons write there until restarted) are carried
// into the new map when the links switch: a revoke is not undone.
func TestMigrationCatchesUpWithTheOldMap(t *testing.T) {
	e := newEnv(t)
	old := e.pinLayoutV1(t)
	loader.AddRecordMigration(t, 1, state.MapSessionsV4, convertSessionV1)
	loader.AddCounterMigration(t, 1, state.MapStats)
	late := bpf.AegisSessionKeyV4{Src: [4]byte{192, 0, 2, 11}, Dst: [4]byte{198, 51, 100, 10}, Dport: 8080, Proto: 6}

	e.mustLoad(func(l *loader.Loader) {
		l.Attach = func(o link.XDPOptions) (link.Link, error) {
			// Between the copy and the switch: an old daemon revokes the
			// first session and grants another, in the old map.
			m, err := ebpf.LoadPinnedMap(state.MapPath(e.pin, state.MapSessionsV4), nil)
			if err != nil {
				return nil, err
			}
			defer m.Close()
			if m.ValueSize() != sessionV1Size {
				return nil, fmt.Errorf("the old map is no longer pinned before the switch (value size %d)", m.ValueSize())
			}
			if err := m.Delete(&old.key); err != nil {
				return nil, err
			}
			if err := m.Put(&late, old.session[:]); err != nil {
				return nil, err
			}
			return link.AttachXDP(o)
		}
	})
	m := e.open()
	var sv bpf.AegisSessionValue
	if err := m.SessionsV4.Lookup(&old.key, &sv); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatalf("a session revoked during the upgrade is back: %v %+v", err, sv)
	}
	if err := m.SessionsV4.Lookup(&late, &sv); err != nil {
		t.Fatalf("a session granted during the upgrade was lost: %v", err)
	}
}

// setPinnedVersion rewrites the layout version in the pinned config, as if
// an older release had written it.
func (e *env) setPinnedVersion(v uint32) {
	e.t.Helper()
	m, err := ebpf.LoadPinnedMap(state.MapPath(e.pin, state.MapConfig), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Close()
	raw, err := m.LookupBytes(uint32(0))
	if err != nil {
		e.t.Fatal(err)
	}
	binary.NativeEndian.PutUint32(raw, v)
	if err := m.Put(uint32(0), raw); err != nil {
		e.t.Fatal(err)
	}
}

// programUsesPins fails t unless the program every link runs is the pinned
// one and reads the pinned config map, not a replaced one.
func (e *env) programUsesPins(ifaces ...string) {
	e.t.Helper()
	p, err := ebpf.LoadPinnedProgram(state.ProgramPath(e.pin), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		e.t.Fatal(err)
	}
	id, _ := info.ID()
	for _, iface := range ifaces {
		if got := e.ids(iface).program; got != id {
			e.t.Fatalf("%s runs program %d, the pin holds %d", iface, got, id)
		}
	}
	mapIDs, _ := info.MapIDs()
	cfg := e.mapID(state.MapConfig)
	for _, m := range mapIDs {
		if m == cfg {
			return
		}
	}
	e.t.Fatalf("the program reads maps %v, not the pinned config %d", mapIDs, cfg)
}

// An upgrade across layouts with links attached: the config is replaced,
// so the program is loaded afresh against it even though the pinned one is
// this very build; one that fails half-way (here: the second link's
// update) is finished by the next load, which leaves every link on the
// pinned program reading the pinned config.
func TestLayoutUpgradeOverAttachedLinks(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "-i", "a1")
	e.grant(testSession)
	before := e.ids("a0")

	e.setPinnedVersion(1)
	calls := 0
	r := e.cli(func(l *loader.Loader) {
		l.Update = func(lk link.Link, p *ebpf.Program) error {
			if calls++; calls == 2 {
				return errors.New("injected crash")
			}
			return lk.Update(p)
		}
	}, e.loadArgs("-i", "a1")...)
	if r.code != 1 || calls != 2 {
		t.Fatalf("half-way upgrade (%d link updates): %+v", calls, r)
	}
	if e.xdpProgram("a0") == e.xdpProgram("a1") {
		t.Fatal("the injected failure did not leave the links on different programs")
	}
	e.noStagedPins()
	if v, _, _ := state.PinnedLayoutVersion(e.pin); v != 1 {
		t.Fatalf("a failed upgrade left layout version %d", v)
	}

	r = e.mustLoad(nil, "-i", "a1", "--json")
	var res loader.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	if strings.Join(res.MigratedMaps, ",") != state.MapConfig || len(res.Upgraded) != 2 {
		t.Fatalf("converging load: %+v", res)
	}
	after := e.ids("a0")
	if after.link != before.link || after.maps[state.MapSessionsV4] != before.maps[state.MapSessionsV4] {
		t.Fatalf("link or sessions map replaced: %+v -> %+v", before, after)
	}
	if after.maps[state.MapConfig] == before.maps[state.MapConfig] {
		t.Fatal("config not replaced")
	}
	e.programUsesPins("a0", "a1")
	e.noStagedPins()
	e.mustHaveSession(testSession)
	if v, _, _ := state.PinnedLayoutVersion(e.pin); v != bpf.LayoutVersion {
		t.Fatalf("layout version %d", v)
	}
}
