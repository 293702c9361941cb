//go:build unix

package main

import "syscall"

// writeNow writes as much of p as the connection takes without blocking
// and reports how much that was. Go's sockets are non-blocking underneath,
// so a full socket buffer answers EAGAIN instead of waiting.
func writeNow(raw syscall.RawConn, p []byte) (int, error) {
	if raw == nil {
		return 0, nil
	}
	n := 0
	var werr error
	err := raw.Write(func(fd uintptr) bool {
		for n < len(p) {
			m, err := syscall.Write(int(fd), p[n:])
			switch {
			case err == syscall.EINTR:
				continue
			case err == syscall.EAGAIN:
				return true // leave the rest for a blocking write
			case err != nil:
				werr = err
				return true
			}
			n += m
		}
		return true
	})
	if werr != nil {
		return n, werr
	}
	return n, err
}
