package aegisctl

// Target is target, for the table test of addresses.
var Target = target

// WriteJSON is writeJSON, for golden tests of the JSON output.
var WriteJSON = writeJSON

// WriteJSONLine is writeJSONLine, for the golden test of watch --json.
var WriteJSONLine = writeJSONLine
