package state

import (
	"fmt"
	"strconv"
	"unicode"
	"unicode/utf8"
)

// This file holds the one rule for what a session's user may be, and the
// rule for showing a string that breaks it. A user name is printed in
// tables, logs and terminals by tools that do not know where it came
// from; a newline, an escape sequence or a bidi override in it would let
// whoever chose the name forge table rows or rewrite an operator's
// terminal. So names are refused at every writer (Session.Validate, which
// every grant path runs), and every reader escapes what it did not write.

// ValidateUser returns an error wrapping ErrInvalid unless user can be a
// session's user: 1 to MaxUserLen bytes of valid UTF-8, every character
// printable (unicode.IsPrint: letters, marks, numbers, punctuation,
// symbols and the ASCII space; so no control characters, C0 or C1, no
// format characters such as bidi overrides or zero-width joiners, no
// other spaces or separators), and no space at either end.
func ValidateUser(user string) error {
	switch {
	case user == "":
		return fmt.Errorf("%w: user is empty", ErrInvalid)
	case len(user) > MaxUserLen:
		return fmt.Errorf("%w: user is %d bytes, at most %d fit", ErrInvalid, len(user), MaxUserLen)
	case user[0] == ' ' || user[len(user)-1] == ' ':
		return fmt.Errorf("%w: user starts or ends with a space", ErrInvalid)
	}
	for i, r := range user {
		switch {
		case r == utf8.RuneError && isBadByte(user[i:]):
			return fmt.Errorf("%w: user is not valid UTF-8 (byte %d)", ErrInvalid, i)
		case r == 0:
			return fmt.Errorf("%w: user contains a NUL byte", ErrInvalid)
		case !unicode.IsPrint(r):
			return fmt.Errorf("%w: user contains the non-printable character %U at byte %d", ErrInvalid, r, i)
		}
	}
	return nil
}

// isBadByte reports whether s starts with an invalid UTF-8 sequence, as
// opposed to an encoded U+FFFD.
func isBadByte(s string) bool {
	_, size := utf8.DecodeRuneInString(s)
	return size <= 1
}

// Printable reports whether s is valid UTF-8 of printable characters
// only (unicode.IsPrint), so that it can be shown as it is.
func Printable(s string) bool {
	for i, r := range s {
		if (r == utf8.RuneError && isBadByte(s[i:])) || !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// Escape returns s as it is if it is Printable, else quoted and escaped
// the Go way (strconv.Quote: "\n", "\x1b", "\u202e"), so that a string
// read from a map or a client never reaches a terminal or a log line with
// a control or format character in it. Every valid user passes through
// unchanged.
func Escape(s string) string {
	if Printable(s) {
		return s
	}
	return strconv.Quote(s)
}
