package reaper

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
)

// Label values. Families and causes only: never an address or a user.
const (
	familyV4 = "ipv4"
	familyV6 = "ipv6"
)

// metrics are the reaper's Prometheus series, registered on their own
// registry so that tests and the process never share global state.
type metrics struct {
	reg      *prometheus.Registry
	reaped   *prometheus.CounterVec
	scanned  *prometheus.CounterVec
	regrant  *prometheus.CounterVec
	kept     *prometheus.CounterVec
	buried   *prometheus.CounterVec
	closed   prometheus.Counter
	duration prometheus.Histogram
	errors   prometheus.Counter
	last     prometheus.Gauge
}

func newMetrics(pinPath string, log zerolog.Logger) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		reaped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_reaper_sessions_reaped_total",
			Help: "Expired sessions deleted, by address family and reason (idle or lifetime).",
		}, []string{"family", "reason"}),
		scanned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_reaper_sessions_scanned_total",
			Help: "Session map entries read by sweeps, by address family.",
		}, []string{"family"}),
		regrant: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_reaper_sessions_regranted_total",
			Help: "Sessions found expired by a sweep's scan and live when read again before the delete (granted again meanwhile), and kept.",
		}, []string{"family"}),
		kept: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_reaper_sessions_kept_total",
			Help: "Expired sessions a sweep left in the map, dead, because the tombstone map had no room (counted once per sweep that kept them).",
		}, []string{"family"}),
		buried: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aegis_reaper_tombstones_deleted_total",
			Help: "Tombstones deleted by sweeps: no packet from the service to the user within the UDP flow idle timeout.",
		}, []string{"family"}),
		closed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "aegis_reaper_interrupted_sections_total",
			Help: "Deleting sections left open by a reaper that died inside one, closed by a later sweep.",
		}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "aegis_reaper_sweep_duration_seconds",
			Help: "Wall time of one sweep over both sessions maps.",
			// 1 ms (an empty map) to about a minute (millions of sessions
			// on a slow machine).
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 9),
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "aegis_reaper_sweep_errors_total",
			Help: "Sweeps that failed.",
		}),
		last: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "aegis_reaper_last_sweep_timestamp_seconds",
			Help: "Unix time at which the last successful sweep finished; 0 before the first.",
		}),
	}
	for _, f := range []string{familyV4, familyV6} {
		for _, r := range []state.Expiry{state.ExpiredIdle, state.ExpiredLifetime} {
			m.reaped.WithLabelValues(f, r.String())
		}
		m.scanned.WithLabelValues(f)
		m.regrant.WithLabelValues(f)
		m.kept.WithLabelValues(f)
		m.buried.WithLabelValues(f)
	}
	// The reaper needs only the pins, never the control plane: the
	// filter's state is exported from here so that it is visible while
	// the control plane is down.
	m.reg.MustRegister(m.reaped, m.scanned, m.regrant, m.kept, m.buried, m.closed, m.duration, m.errors, m.last,
		daemon.NewAttachedCollector(pinPath, log), daemon.BuildInfo(),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe records one sweep, complete or not.
func (m *metrics) observe(res state.SweepResult, took time.Duration, complete bool) {
	for _, f := range []struct {
		name string
		r    state.FamilyResult
		t    state.TombResult
	}{{familyV4, res.V4, res.TombsV4}, {familyV6, res.V6, res.TombsV6}} {
		m.reaped.WithLabelValues(f.name, state.ExpiredIdle.String()).Add(float64(f.r.Idle))
		m.reaped.WithLabelValues(f.name, state.ExpiredLifetime.String()).Add(float64(f.r.Lifetime))
		m.scanned.WithLabelValues(f.name).Add(float64(f.r.Scanned))
		m.regrant.WithLabelValues(f.name).Add(float64(f.r.Regranted))
		m.kept.WithLabelValues(f.name).Add(float64(f.r.Kept))
		m.buried.WithLabelValues(f.name).Add(float64(f.t.Deleted))
	}
	m.closed.Add(float64(res.Interrupted))
	if complete {
		m.duration.Observe(took.Seconds())
		m.last.SetToCurrentTime()
	}
}
