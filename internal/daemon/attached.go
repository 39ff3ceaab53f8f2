package daemon

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
)

var attachedDesc = prometheus.NewDesc("aegis_datapath_attached",
	"1 while the configured interface is filtered by the XDP program, 0 while it is not (missing device, defunct link, operator-detached, foreign program); see aegis-loader status.",
	[]string{"interface"}, nil)

// attachedCollector judges the configured interfaces at each scrape, so
// that the series is as fresh as the scrape and needs no loop of its own.
type attachedCollector struct {
	pinPath string
	log     zerolog.Logger
	mu      sync.Mutex
	lastErr string
}

// NewAttachedCollector exports aegis_datapath_attached{interface} for
// every interface configured under pinPath, by state's definition of
// filtered. Nothing is exported while no interface is recorded (the loader
// has not run).
// A failed check is logged once per change.
func NewAttachedCollector(pinPath string, log zerolog.Logger) prometheus.Collector {
	return &attachedCollector{pinPath: pinPath, log: log}
}

func (c *attachedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- attachedDesc }

func (c *attachedCollector) Collect(ch chan<- prometheus.Metric) {
	verdicts, err := state.CheckInterfaces(c.pinPath)
	msg := ""
	if err != nil && !errors.Is(err, state.ErrNotLoaded) {
		msg = err.Error()
	}
	c.mu.Lock()
	if msg != c.lastErr && msg != "" {
		c.log.Warn().Err(err).Msg("metrics: cannot check the configured interfaces")
	}
	c.lastErr = msg
	c.mu.Unlock()
	if err != nil {
		return
	}
	for _, v := range verdicts {
		val := 0.0
		if v.Filtered {
			val = 1
		}
		ch <- prometheus.MustNewConstMetric(attachedDesc, prometheus.GaugeValue, val, v.Interface.Name)
	}
}
