package main

import (
	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/loader"
	"github.com/aegis-agent/aegis/reaper"
)

var commands = []command{
	{"aegis-loader", loader.Main, [][]string{{"load"}, {"unload"}, {"status"}, {"watch"}}},
	{"aegis-controlplane", controlplane.Main, [][]string{{}}},
	{"aegis-reaper", reaper.Main, [][]string{{}}},
	{"aegisctl", aegisctl.Main, [][]string{{"login"}, {"logout"}, {"sessions"}, {"stats"}, {"watch"},
		{"local", "sessions"}, {"local", "stats"}, {"certs"}}},
}
