package loader

// ParseProcAddr is parseProcAddr, for the table test of /proc/net/tcp.
var ParseProcAddr = parseProcAddr
