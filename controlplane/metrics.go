package controlplane

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/aegis-agent/aegis/internal/daemon"
)

// Metrics. Labels never carry addresses or user names. The data path's
// own series (aegis_datapath_*: verdict counters, map fill, monitor mode)
// are the reaper's, so that they outlive this process; here only what the
// control plane does and sees:
//
//	aegis_controlplane_datapath_loaded        gauge: 1 when this process can use the pinned maps
//	aegis_controlplane_datapath_filtered      gauge: 1 when, besides, every configured interface is filtered (health SERVING)
//	aegis_controlplane_grants_total{api,result}
//	aegis_controlplane_revokes_total{api,result}
//	aegis_controlplane_certificate_expiry_timestamp_seconds{certificate}
//	aegis_controlplane_tls_reloads_total{result}
//	aegis_controlplane_tls_handshake_failures_total{reason} (tlsmetrics.go)
//	aegis_controlplane_monitor_*              MonitorSessions snapshots and streams (monitor.go)
//	aegis_controlplane_verdict_reader_switches_total  the events reader moved to a new events map (watch.go)
//	aegis_store_*                             the session store, with --store (storemetrics.go)
//	aegis_grpc_server_*                       go-grpc-middleware's server metrics
//	aegis_build_info{version,program_tag}     as every daemon
type metrics struct {
	s               *Server
	grants, revokes *prometheus.CounterVec
	grantC, revokeC map[[2]string]prometheus.Counter
	loaded          *prometheus.Desc
	filtered        *prometheus.Desc
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
	cs := []prometheus.Collector{m.grants, m.revokes, mapsCollector{m}, daemon.BuildInfo(), m.s.tlsFailures,
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "aegis_controlplane_verdict_reader_switches_total",
			Help: "Times the verdict events reader (WatchVerdicts) moved to a new events map, after the loader unloaded and loaded the data path again.",
		}, func() float64 { return float64(m.s.vh.switches.Load()) })}
	cs = append(cs, m.s.mon.collectors()...)
	if m.s.sl != nil {
		cs = append(cs, m.s.sl.m.collectors()...)
	}
	if c := m.s.opts.Certificates; c != nil {
		cs = append(cs,
			c.expiryCollector(),
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

// mapsCollector says whether this process can use the pinned maps and
// whether the data path enforces as its health reports it: the data-path
// facts that are the control plane's own (its session RPCs fail with
// Unavailable without the maps). It reads nothing at scrape time: the
// refresh loop already did. Per-interface attachment is the reaper's
// aegis_datapath_attached.
type mapsCollector struct{ m *metrics }

func (c mapsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.m.loaded; ch <- c.m.filtered }

func (c mapsCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, on bool) {
		v := 0.0
		if on {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	gauge(c.m.loaded, c.m.s.Loaded())
	gauge(c.m.filtered, c.m.s.Filtered())
}
