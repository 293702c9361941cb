//go:build !unix

package main

import "syscall"

// writeNow writes nothing where sockets are not file descriptors that
// take a non-blocking write(2) (Windows): every write then takes the slow
// path, a blocking write on a goroutine of the stream's own.
func writeNow(raw syscall.RawConn, p []byte) (int, error) { return 0, nil }
