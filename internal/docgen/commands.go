package main

import (
	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/loader"
	"github.com/aegis-agent/aegis/reaper"
)

var commands = []command{
	{"aegis-loader", loader.Main, [][]string{{"load"}, {"unload"}, {"status"}}, "8",
		"The data path lives in the kernel, pinned under the pin directory, not in a process: " +
			"stopping aegis-loader.service leaves the filter attached; only \"aegis-loader unload\" detaches it."},
	{"aegis-controlplane", controlplane.Main, [][]string{{}}, "8",
		"Run by aegis-controlplane.service as user aegis with CAP_BPF only, socket-activated by " +
			"aegis-controlplane.socket; it reads its TLS material through systemd credentials."},
	{"aegis-reaper", reaper.Main, [][]string{{}}, "8",
		"Run by aegis-reaper.service as user aegis with CAP_BPF only. The data path already refuses " +
			"expired sessions; the reaper reclaims their space."},
	{"aegisctl", aegisctl.Main, [][]string{{"login"}, {"logout"}, {"sessions"}, {"stats"}, {"watch"},
		{"local", "sessions"}, {"local", "stats"}, {"certs"}}, "1",
		"The remote commands talk to aegis-controlplane over gRPC with mutual TLS, as the Aegis " +
			"controller does; \"aegisctl local\" reads the pinned maps directly and needs root on the gateway."},
}
