package reaper

import (
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
)

// The reaper is the data path's exporter: the aegis_datapath_* series
// (verdict counters, map fill and capacity, monitor mode) are read from
// the pinned maps at scrape time here, and only here.
//
// Why this process: it already holds the maps open and follows the
// loader's unload and reload of them, it needs only the pins (never the
// control plane), and it is the daemon whose failure matters least to the
// data path, so the counters keep flowing while the control plane is down,
// restarting, or refusing connections. A fourth daemon would add a unit,
// a user of the pins and a port for no gain; the control plane exporting
// the same series too would give two processes one name with different
// scrape times (and different values whenever one lags), which breaks
// every sum() over a job-less selector.
type exporter struct {
	maps *state.Handle
	log  zerolog.Logger

	packets, bytes            *prometheus.Desc
	active, entries, sessCap  *prometheus.Desc
	allow, allowCap           *prometheus.Desc
	allowHits                 *prometheus.Desc
	monitor, loaded           *prometheus.Desc
	tombs, tombsLive, tombCap *prometheus.Desc
	marks                     *prometheus.Desc

	// lastErr is the read error last logged: a broken map is said once
	// per change, not once per scrape.
	mu      sync.Mutex
	lastErr string
}

func newExporter(maps *state.Handle, log zerolog.Logger) *exporter {
	vr := []string{"verdict", "reason"}
	fam := []string{"family"}
	return &exporter{
		maps: maps, log: log,
		packets: prometheus.NewDesc("aegis_datapath_packets_total",
			"Packets the XDP program passed or dropped, by verdict and reason, summed over CPUs at scrape time.", vr, nil),
		bytes: prometheus.NewDesc("aegis_datapath_bytes_total",
			"Bytes of the packets the XDP program passed or dropped, by verdict and reason.", vr, nil),
		active: prometheus.NewDesc("aegis_datapath_sessions_active",
			"Sessions the data path passes traffic for now, by address family.", fam, nil),
		entries: prometheus.NewDesc("aegis_datapath_sessions_entries",
			"Entries of the sessions maps, expired sessions not yet reaped included, by address family.", fam, nil),
		sessCap: prometheus.NewDesc("aegis_datapath_sessions_capacity",
			"Capacity of the sessions maps (aegis-loader --max-sessions), by address family.", fam, nil),
		allow: prometheus.NewDesc("aegis_datapath_allow_entries",
			"Prefixes in the static allow maps, by address family (one prefix holds every port rule of its source).", fam, nil),
		allowCap: prometheus.NewDesc("aegis_datapath_allow_capacity",
			"Capacity of the static allow maps in prefixes, by address family.", fam, nil),
		// The rule's id, not the rule, labels the series: a rule is a
		// prefix, and no label value is an address. Ids are bounded (255
		// per family), stable while the rule stays loaded, and listed with
		// their rules by aegis-loader status and aegisctl stats.
		allowHits: prometheus.NewDesc("aegis_datapath_allow_rule_packets_total",
			"Packets each static allow rule admitted, by address family and rule id (aegis-loader status and aegisctl stats list the rules with their ids); rule_id 0 counts the rules without a counter of their own.",
			[]string{"family", "rule_id"}, nil),
		monitor: prometheus.NewDesc("aegis_datapath_monitor_mode",
			"1 when the data path runs in monitor mode (would-be drops pass and count as reason monitor), 0 when it enforces.", nil, nil),
		tombs: prometheus.NewDesc("aegis_datapath_tombstones_entries",
			"Tombstones of revoked or reaped sessions (the egress program opens no flow back to their users), by address family.", fam, nil),
		tombsLive: prometheus.NewDesc("aegis_datapath_tombstones_active",
			"Tombstones that still refuse flows: a packet from the service to the user within the UDP flow idle timeout, by address family.", fam, nil),
		tombCap: prometheus.NewDesc("aegis_datapath_tombstones_capacity",
			"Capacity of the tombstone maps, by address family; when full, removed sessions stay in the sessions maps, dead, until there is room.", fam, nil),
		marks: prometheus.NewDesc("aegis_datapath_port_marks_trusted",
			"1 when the data path trusts its port marks of this kind (sessions: the control plane has marked every session's port; flows: the loader has marked every flow's) and skips lookups at unmarked ports; 0 while it makes every lookup.",
			[]string{"kind"}, nil),
		loaded: prometheus.NewDesc("aegis_datapath_loaded",
			"1 when the reaper can read the pinned maps; 0 when they are missing or unreadable (the other aegis_datapath_ series are then absent).", nil, nil),
	}
}

func (e *exporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{e.packets, e.bytes, e.active, e.entries, e.sessCap, e.allow, e.allowCap, e.allowHits, e.monitor, e.loaded,
		e.tombs, e.tombsLive, e.tombCap, e.marks} {
		ch <- d
	}
}

// Collect reads everything before sending anything, so a scrape sees all
// of the data path's series or none of them, never half.
//
// It first follows the pins (an unload, a reload), as the sweep loop does
// on its own interval: a scrape must not report maps the loader removed
// an interval ago. Behind a sweep in progress that waits for the sweep's
// end; Prometheus's scrape timeout bounds it.
func (e *exporter) Collect(ch chan<- prometheus.Metric) {
	var out []prometheus.Metric
	err := e.maps.Refresh()
	if err == nil {
		err = e.maps.Do(func(m *state.Maps) error {
			var err error
			out, err = e.read(m)
			return err
		})
	}
	e.mu.Lock()
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != e.lastErr && err != nil && !errors.Is(err, state.ErrNotLoaded) {
		e.log.Warn().Err(err).Msg("metrics: read the data path's maps")
	}
	e.lastErr = msg
	e.mu.Unlock()
	if err != nil {
		ch <- prometheus.MustNewConstMetric(e.loaded, prometheus.GaugeValue, 0)
		return
	}
	for _, m := range out {
		ch <- m
	}
	ch <- prometheus.MustNewConstMetric(e.loaded, prometheus.GaugeValue, 1)
}

func (e *exporter) read(m *state.Maps) ([]prometheus.Metric, error) {
	cfg, err := m.ReadConfig()
	if err != nil {
		return nil, err
	}
	counters, err := m.ReadStats()
	if err != nil {
		return nil, err
	}
	v4, v6, err := m.Fill(cfg.DefaultIdleTimeout, state.Now())
	if err != nil {
		return nil, err
	}
	t4, t6, err := m.TombFill(cfg, state.Now())
	if err != nil {
		return nil, err
	}
	a4, err := countKeys(m.AllowV4)
	if err != nil {
		return nil, err
	}
	a6, err := countKeys(m.AllowV6)
	if err != nil {
		return nil, err
	}
	hits, err := state.ReadAllowHits(m)
	if err != nil {
		return nil, err
	}
	sessMarks, flowMarks, err := state.MarksTrusted(m.PortMarks)
	if err != nil {
		return nil, err
	}
	out := make([]prometheus.Metric, 0, 2*len(state.Reasons)+19)
	out = append(out,
		prometheus.MustNewConstMetric(e.marks, prometheus.GaugeValue, b2f(sessMarks), "sessions"),
		prometheus.MustNewConstMetric(e.marks, prometheus.GaugeValue, b2f(flowMarks), "flows"))
	for _, r := range state.Reasons {
		out = append(out,
			prometheus.MustNewConstMetric(e.packets, prometheus.CounterValue, float64(counters[r].Packets), r.Verdict(), r.String()),
			prometheus.MustNewConstMetric(e.bytes, prometheus.CounterValue, float64(counters[r].Bytes), r.Verdict(), r.String()))
	}
	for _, f := range []struct {
		family string
		fill   state.Fill
		allow  int
		allowM *ebpf.Map
		tombs  state.Fill
	}{{familyV4, v4, a4, m.AllowV4, t4}, {familyV6, v6, a6, m.AllowV6, t6}} {
		out = append(out,
			prometheus.MustNewConstMetric(e.active, prometheus.GaugeValue, float64(f.fill.Active), f.family),
			prometheus.MustNewConstMetric(e.entries, prometheus.GaugeValue, float64(f.fill.Entries), f.family),
			prometheus.MustNewConstMetric(e.sessCap, prometheus.GaugeValue, float64(f.fill.Capacity), f.family),
			prometheus.MustNewConstMetric(e.allow, prometheus.GaugeValue, float64(f.allow), f.family),
			prometheus.MustNewConstMetric(e.allowCap, prometheus.GaugeValue, float64(f.allowM.MaxEntries()), f.family),
			prometheus.MustNewConstMetric(e.tombs, prometheus.GaugeValue, float64(f.tombs.Entries), f.family),
			prometheus.MustNewConstMetric(e.tombsLive, prometheus.GaugeValue, float64(f.tombs.Active), f.family),
			prometheus.MustNewConstMetric(e.tombCap, prometheus.GaugeValue, float64(f.tombs.Capacity), f.family))
	}
	for i, fam := range []string{familyV4, familyV6} {
		out = append(out, prometheus.MustNewConstMetric(e.allowHits, prometheus.CounterValue, float64(hits.Unnumbered[i]), fam, "0"))
	}
	for _, h := range hits.Rules {
		if h.ID == 0 {
			continue
		}
		fam := familyV4
		if h.Rule.Prefix.Addr().Is6() {
			fam = familyV6
		}
		out = append(out, prometheus.MustNewConstMetric(e.allowHits, prometheus.CounterValue, float64(h.Packets), fam, strconv.Itoa(int(h.ID))))
	}
	return append(out, prometheus.MustNewConstMetric(e.monitor, prometheus.GaugeValue, b2f(cfg.Monitor))), nil
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// countKeys counts an LPM trie's prefixes; tries have no batch lookup.
// The allow maps hold tens of entries, written by the loader only.
func countKeys(m *ebpf.Map) (int, error) {
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// intervalGauge is aegis_reaper_sweep_interval_seconds, --cleanup-interval:
// what a "last sweep too long ago" alert compares with, so the rule needs
// no copy of the flag.
func intervalGauge(d time.Duration) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "aegis_reaper_sweep_interval_seconds",
		Help: "Time between two sweeps (--cleanup-interval).",
	})
	g.Set(d.Seconds())
	return g
}
