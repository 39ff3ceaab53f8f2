package loader

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/state"
)

// lockNoticeAfter is how long a loader waits on the pin directory's lock
// before it says whom it waits for: a load takes well under a second, so a
// longer wait is another loader (or a hung one) the operator should know
// about.
const lockNoticeAfter = time.Second

// lockWaiting takes the flock on f (exclusive), calling notice with the
// holder's pid (0 if unknown) once it has waited lockNoticeAfter.
func lockWaiting(f *os.File, notice func(pid int)) (*state.Lock, error) {
	if notice == nil {
		return state.LockOpenDir(f, true)
	}
	timer := time.AfterFunc(lockNoticeAfter, func() { notice(flockHolder(f)) })
	defer timer.Stop()
	return state.LockOpenDir(f, true)
}

// flockHolder returns the pid that holds a flock on the file f, from
// /proc/locks (pids as this process's pid namespace sees them), or 0.
func flockHolder(f *os.File) int {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0
	}
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	locks, err := os.Open("/proc/locks")
	if err != nil {
		return 0
	}
	defer locks.Close()
	sc := bufio.NewScanner(locks)
	for sc.Scan() {
		// "1: FLOCK  ADVISORY  WRITE 19337 00:27:326319 0 EOF"; waiters
		// have "->" after the number.
		fl := strings.Fields(sc.Text())
		if len(fl) < 6 || fl[1] == "->" || fl[1] != "FLOCK" || fl[5] != want {
			continue
		}
		if pid, err := strconv.Atoi(fl[4]); err == nil && pid != os.Getpid() {
			return pid
		}
	}
	return 0
}

// lockNotice logs that the loader waits for the pin directory's lock.
func (l *Loader) lockNotice(dir string) func(pid int) {
	return func(pid int) {
		if pid != 0 {
			l.Log.Warn().Int("pid", pid).Str("dir", dir).
				Msg(fmt.Sprintf("waiting for another aegis-loader (pid %d) holding the lock on %s", pid, dir))
			return
		}
		l.Log.Warn().Str("dir", dir).Msg("waiting for another aegis-loader holding the lock on " + dir)
	}
}
