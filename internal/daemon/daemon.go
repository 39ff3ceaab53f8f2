// Package daemon is what the two long-running Aegis processes share with
// systemd and Prometheus: readiness and stopping notifications, a watchdog
// that pings only while the process is healthy, and the metrics endpoint.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"
)

// Ready tells systemd (Type=notify) that the service is up. Outside
// systemd it does nothing.
func Ready(log zerolog.Logger) {
	if ok, err := sd.SdNotify(false, sd.SdNotifyReady); err != nil {
		log.Warn().Err(err).Msg("notify systemd: ready")
	} else if ok {
		log.Debug().Msg("notified systemd: ready")
	}
}

// Stopping tells systemd that the service is shutting down.
func Stopping(log zerolog.Logger) {
	if _, err := sd.SdNotify(false, sd.SdNotifyStopping); err != nil {
		log.Warn().Err(err).Msg("notify systemd: stopping")
	}
}

// Status sets the one-line status systemctl status shows.
func Status(status string) { _, _ = sd.SdNotify(false, "STATUS="+status) }

// Watchdog pings systemd's watchdog at half its interval for as long as
// healthy returns nil, until ctx ends. A process that is wedged, or whose
// health check fails, stops pinging and systemd restarts it. It returns at
// once when the watchdog is not enabled (WATCHDOG_USEC unset).
func Watchdog(ctx context.Context, log zerolog.Logger, healthy func() error) {
	interval, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn().Err(err).Msg("read systemd watchdog settings")
		return
	}
	if interval == 0 {
		return
	}
	log.Debug().Stringer("interval", interval).Msg("systemd watchdog enabled")
	tick := time.NewTicker(interval / 2)
	defer tick.Stop()
	for {
		if err := healthy(); err != nil {
			log.Error().Err(err).Msg("unhealthy: not pinging the systemd watchdog")
		} else if _, err := sd.SdNotify(false, sd.SdNotifyWatchdog); err != nil {
			log.Warn().Err(err).Msg("ping systemd watchdog")
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// MetricsServer serves reg in the Prometheus text format on /metrics.
type MetricsServer struct {
	srv *http.Server
	ln  net.Listener
}

// ListenMetrics binds addr; Serve starts answering. Binding first lets the
// caller fail fast, before it reports readiness, on an address in use.
func ListenMetrics(addr string, reg *prometheus.Registry) (*MetricsServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return &MetricsServer{
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second},
		ln:  ln,
	}, nil
}

// Addr is the bound address (useful with port 0).
func (m *MetricsServer) Addr() net.Addr { return m.ln.Addr() }

// Serve answers until Shutdown.
func (m *MetricsServer) Serve(log zerolog.Logger) {
	if err := m.srv.Serve(m.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error().Err(err).Msg("metrics server")
	}
}

// Shutdown stops the server, waiting for in-flight scrapes until ctx ends.
func (m *MetricsServer) Shutdown(ctx context.Context) error { return m.srv.Shutdown(ctx) }
