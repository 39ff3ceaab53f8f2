package controlplane

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
)

// Metrics. Labels never carry addresses or user names.
//
//	aegis_xdp_packets_total{verdict,reason}   counter, from the stats map at scrape time
//	aegis_xdp_bytes_total{verdict,reason}     counter, idem
//	aegis_sessions_active{family}             gauge: sessions the data path passes now
//	aegis_sessions_entries{family}            gauge: map entries, expired ones not yet reaped included
//	aegis_sessions_capacity{family}           gauge: map size (aegis-loader --max-sessions)
//	aegis_controlplane_datapath_loaded        gauge: 1 when the pinned maps are usable
//	aegis_controlplane_datapath_filtered      gauge: 1 when, besides, every configured interface is filtered (health SERVING)
//	aegis_datapath_attached{interface}        gauge: 1 while that configured interface is filtered
//	aegis_controlplane_grants_total{api,result}
//	aegis_controlplane_revokes_total{api,result}
//	aegis_controlplane_tls_certificate_expiry_timestamp_seconds
//	aegis_controlplane_tls_reloads_total{result}
//	aegis_controlplane_build_info{version}
//	aegis_controlplane_monitor_*              MonitorSessions snapshots and streams (monitor.go)
//	aegis_grpc_server_*                       go-grpc-middleware's server metrics
type metrics struct {
	s                *Server
	grants, revokes  *prometheus.CounterVec
	grantC, revokeC  map[[2]string]prometheus.Counter
	xdpPackets       *prometheus.Desc
	xdpBytes         *prometheus.Desc
	sessionsActive   *prometheus.Desc
	sessionsEntries  *prometheus.Desc
	sessionsCapacity *prometheus.Desc
	loaded           *prometheus.Desc
	filtered         *prometheus.Desc
}

func newMetrics(s *Server) *metrics {
	m := &metrics{
		s: s,
		grants: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_controlplane_grants_total",
			Help: "Session grants by API (compat, agent) and result (created, refreshed, taken_over, conflict, invalid, full, unavailable, error).",
		}, []string{"api", "result"}),
		revokes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_controlplane_revokes_total",
			Help: "Session revocations by API (compat, agent) and result (revoked, not_found, invalid, unavailable, error).",
		}, []string{"api", "result"}),
		grantC:  make(map[[2]string]prometheus.Counter),
		revokeC: make(map[[2]string]prometheus.Counter),
		xdpPackets: prometheus.NewDesc("aegis_xdp_packets_total",
			"Packets the XDP program passed or dropped, by verdict and reason.", []string{"verdict", "reason"}, nil),
		xdpBytes: prometheus.NewDesc("aegis_xdp_bytes_total",
			"Bytes of the packets the XDP program passed or dropped, by verdict and reason.", []string{"verdict", "reason"}, nil),
		sessionsActive: prometheus.NewDesc("aegis_sessions_active",
			"Sessions the data path passes traffic for, by address family.", []string{"family"}, nil),
		sessionsEntries: prometheus.NewDesc("aegis_sessions_entries",
			"Entries of the sessions maps, expired sessions not yet reaped included, by address family.", []string{"family"}, nil),
		sessionsCapacity: prometheus.NewDesc("aegis_sessions_capacity",
			"Capacity of the sessions maps, by address family.", []string{"family"}, nil),
		loaded: prometheus.NewDesc("aegis_controlplane_datapath_loaded",
			"1 when the data path's pinned maps are usable, 0 when they are missing or cannot be opened.", nil, nil),
		filtered: prometheus.NewDesc("aegis_controlplane_datapath_filtered",
			"1 when the maps are usable and every configured interface is filtered (health SERVING), 0 otherwise; as of the last check, once a second.", nil, nil),
	}
	// Children created up front: every series exists from the start, and
	// the hot path does a read-only map lookup instead of hashing labels.
	for _, api := range []string{apiCompat, apiAgent} {
		for _, r := range []string{resultCreated, resultRefreshed, resultTakenOver, resultConflict, resultInvalid, resultFull, resultUnavailable, resultError} {
			m.grantC[[2]string{api, r}] = m.grants.WithLabelValues(api, r)
		}
		for _, r := range []string{resultRevoked, resultNotFound, resultInvalid, resultUnavailable, resultError} {
			m.revokeC[[2]string{api, r}] = m.revokes.WithLabelValues(api, r)
		}
	}
	return m
}

func (m *metrics) grant(api, result string) {
	if c, ok := m.grantC[[2]string{api, result}]; ok {
		c.Inc()
		return
	}
	m.grants.WithLabelValues(api, result).Inc()
}

func (m *metrics) revoke(api, result string) {
	if c, ok := m.revokeC[[2]string{api, result}]; ok {
		c.Inc()
		return
	}
	m.revokes.WithLabelValues(api, result).Inc()
}

func (m *metrics) collectors() []prometheus.Collector {
	cs := []prometheus.Collector{m.grants, m.revokes, mapsCollector{m}, daemon.NewAttachedCollector(m.s.maps.PinPath(), m.s.log),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "aegis_controlplane_build_info",
			Help:        "Always 1; the version label names the build.",
			ConstLabels: prometheus.Labels{"version": cli.Version()},
		}, func() float64 { return 1 }),
	}
	cs = append(cs, m.s.mon.collectors()...)
	if c := m.s.opts.Certificates; c != nil {
		cs = append(cs,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "aegis_controlplane_tls_certificate_expiry_timestamp_seconds",
				Help: "Expiry (Unix time) of the server certificate in use.",
			}, func() float64 { return float64(c.NotAfter().Unix()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name:        "aegis_controlplane_tls_reloads_total",
				Help:        "Reloads of the TLS files on SIGHUP, by result; a failed one keeps the files loaded before.",
				ConstLabels: prometheus.Labels{"result": "success"},
			}, func() float64 { return float64(c.reloads.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name:        "aegis_controlplane_tls_reloads_total",
				Help:        "Reloads of the TLS files on SIGHUP, by result; a failed one keeps the files loaded before.",
				ConstLabels: prometheus.Labels{"result": "failure"},
			}, func() float64 { return float64(c.failures.Load()) }),
		)
	}
	return cs
}

// mapsCollector reads the pinned maps at scrape time: the per-CPU stats
// summed, and the sessions maps' fill.
type mapsCollector struct{ m *metrics }

func (c mapsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.m.xdpPackets, c.m.xdpBytes, c.m.sessionsActive, c.m.sessionsEntries,
		c.m.sessionsCapacity, c.m.loaded, c.m.filtered} {
		ch <- d
	}
}

func (c mapsCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.m
	err := m.s.maps.Do(func(maps *state.Maps) error {
		cfg, err := maps.ReadConfig()
		if err != nil {
			return err
		}
		counters, err := maps.ReadStats()
		if err != nil {
			return err
		}
		v4, v6, err := maps.Fill(cfg.DefaultIdleTimeout, state.Now())
		if err != nil {
			return err
		}
		for _, r := range state.Reasons {
			ch <- prometheus.MustNewConstMetric(m.xdpPackets, prometheus.CounterValue, float64(counters[r].Packets), r.Verdict(), r.String())
			ch <- prometheus.MustNewConstMetric(m.xdpBytes, prometheus.CounterValue, float64(counters[r].Bytes), r.Verdict(), r.String())
		}
		for _, f := range []struct {
			family string
			fill   state.Fill
		}{{"ipv4", v4}, {"ipv6", v6}} {
			ch <- prometheus.MustNewConstMetric(m.sessionsActive, prometheus.GaugeValue, float64(f.fill.Active), f.family)
			ch <- prometheus.MustNewConstMetric(m.sessionsEntries, prometheus.GaugeValue, float64(f.fill.Entries), f.family)
			ch <- prometheus.MustNewConstMetric(m.sessionsCapacity, prometheus.GaugeValue, float64(f.fill.Capacity), f.family)
		}
		return nil
	})
	loaded := 1.0
	if err != nil {
		loaded = 0
		if !errors.Is(err, state.ErrNotLoaded) {
			m.s.log.Warn().Err(err).Msg("metrics: read the data path's maps")
		}
	}
	ch <- prometheus.MustNewConstMetric(m.loaded, prometheus.GaugeValue, loaded)
	filtered := 0.0
	if m.s.Filtered() {
		filtered = 1
	}
	ch <- prometheus.MustNewConstMetric(m.filtered, prometheus.GaugeValue, filtered)
}
