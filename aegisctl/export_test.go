package aegisctl

// Target is target, for the table test of addresses.
var Target = target
