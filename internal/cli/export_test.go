package cli

// SetJournalSocket points the journal format at a socket of the test's.
func (g *Globals) SetJournalSocket(path string) { g.journalSocket = path }

// EncodeEntry is encodeEntry, for its benchmark.
var EncodeEntry = encodeEntry
