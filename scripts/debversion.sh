#!/bin/sh
# Prints the Debian version of a git describe version, so that versions
# sort as they were made: v1.2 -> 1.2, v1.2-3-gabc -> 1.2+3.gabc (after
# 1.2), an untagged abc123 -> 0.0~git42.abc123 (42 commits in; before any
# release), -dirty -> .dirty.
set -eu
v=${1#v}
case $v in
[0-9]*.*) ;;
*) v=0.0~git$(git rev-list --count HEAD 2>/dev/null || echo 0).$v ;;
esac
echo "$v" | sed -e 's/-\([0-9]*\)-g/+\1.g/' -e 's/-/./g'
