package main

// What a listing costs (SPEC 3a, 10): the memory listings and states
// that are never read hold on the server, and what the store keeps for
// them while they are open. The fuzzing and the benchmarks are
// listbench_test.go's.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// openSnapshots is how many listings and states are in progress: each
// holds a snapshot from when it starts until it is read to its end or
// its connection closes.
func openSnapshots(s *Store) int {
	s.snaps.mu.RLock()
	defer s.snaps.mu.RUnlock()
	return len(s.snaps.active)
}

// serverMemory is the heap in use plus the goroutines' stacks, after
// collecting: what the server (and the test, which holds little) keeps.
func serverMemory() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

// untilQuiet waits until the process has allocated less than 64 KiB in
// each of 50 polls in a row: the server has stopped writing to clients
// that read nothing, their sockets' buffers full. (On a loaded machine a
// writer not scheduled for that long looks quiet too: callers take the
// peak of several measures after it.)
func untilQuiet(t *testing.T) {
	t.Helper()
	var last uint64
	quiet := 0
	waitFor(t, "the server's writes to stop", func() bool {
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		if m.TotalAlloc-last < 64<<10 {
			quiet++
		} else {
			quiet = 0
		}
		last = m.TotalAlloc
		return quiet >= 50
	})
}

// perListing is what a listing in progress may hold on the server, by
// SPEC 10 ("written to the client as it is read: its memory on the server
// is bounded whatever the prefix holds"): one read of the index (256
// keys) encoded, about 256 × 150 bytes here; the index's and the
// listing's chunk arrays; the response's or the frame's buffer; the
// connection's own buffers and its goroutine's stack. 256 KiB is several
// times all of that, whatever the listing holds.
const perListing = 256 << 10

// TestListFlood: 20 clients each GET the whole of a prefix of 50,000 keys
// of about 100 bytes (7.6 MB, more than a socket's buffers take), and 6
// WebSocket clients each list it (whole, or shallow: {items, seq}), and
// none of them reads a byte. While they hang, the server's memory stays
// within perListing per listing (plus 16 MiB for the collector's slack),
// and below one copy of the listing in all, where a listing copied
// before it is written would hold it once per client: the test logs
// both. Then they close, every listing ends (no snapshot is left open),
// and the server answers as before. (Lists queued behind one in progress
// are TestQueuedCursorsEnd's.) TestLoadListFlood is the same over
// 1,000,000 keys and 250 clients.
func TestListFlood(t *testing.T) { listFlood(t, 50_000, 20, 6) }

func TestLoadListFlood(t *testing.T) {
	needLoad(t)
	listFlood(t, 1_000_000, 200, 50)
}

func listFlood(t *testing.T, keys, httpClients, wsClients int) {
	srv, base := newTestServer(t)
	pad := strings.Repeat("v", 90)
	for i := range keys {
		srv.store.Set(fmt.Sprintf("/big/%07d", i), fmt.Sprintf(`{"i":%d,"p":"%s"}`, i, pad), 0)
	}
	// One listing read by a client that reads: its size, and that it is whole.
	resp, err := http.Get(base + "/big/")
	if err != nil {
		t.Fatal(err)
	}
	size, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /big/: %d, %v", resp.StatusCode, err)
	}
	idle := serverMemory()

	addr := strings.TrimPrefix(base, "http://")
	var conns []net.Conn
	stall := func(conn net.Conn) {
		conn.(*net.TCPConn).SetReadBuffer(4096) // and it reads nothing
		conns = append(conns, conn)
	}
	for range httpClients {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		stall(conn)
		fmt.Fprintf(conn, "GET /big/ HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n")
	}
	for i := range wsClients {
		conn, _ := dialRaw(t, base)
		stall(conn)
		shallow := "" // every key of /big/ is direct: as long, as {items, seq}
		if i%2 == 1 {
			shallow = `,"shallow":true`
		}
		conn.Write(clientFrame(true, opText, fmt.Appendf(nil, `{"type":"list","payload":{"prefix":"/big/"%s},"id":%d}`, shallow, i)))
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	listings := httpClients + wsClients
	waitFor(t, "every listing to start", func() bool { return openSnapshots(srv.store) == listings })

	// The writes go on until the sockets' buffers are full: what is
	// allocated meanwhile is mostly bytes on their way out, garbage once
	// written. Then nothing moves, and what is left is what the listings
	// hold.
	untilQuiet(t)
	var peak int64
	for range 3 {
		peak = max(peak, serverMemory()-idle)
	}
	bound := int64(listings*perListing + 16<<20)
	t.Logf("a listing of %d keys is %.1f MB; %d listings never read (%d HTTP, %d WebSocket) hold %.1f MiB of the server's memory above idle, %.0f KiB each (bound %.1f MiB; copied, they would hold %.0f MB)",
		keys, float64(size)/1e6, listings, httpClients, wsClients, float64(peak)/(1<<20), float64(peak)/float64(listings)/1024, float64(bound)/(1<<20), float64(size)*float64(listings)/1e6)
	if peak > bound {
		t.Errorf("%d listings never read hold %d MiB above idle; want at most %d MiB", listings, peak>>20, bound>>20)
	}
	if peak > size {
		t.Errorf("%d listings never read hold %d MiB above idle, more than one copy of the listing (%d MiB)", listings, peak>>20, size>>20)
	}

	for _, c := range conns {
		c.Close()
	}
	conns = nil
	waitFor(t, "every listing to end once its client is gone", func() bool { return openSnapshots(srv.store) == 0 })
	if got := do(t, "GET", fmt.Sprintf("%s/big/%07d", base, keys-1), "").code; got != 200 {
		t.Errorf("GET of a key after the flood: %d; want 200", got)
	}
	p := getPage(t, base+"/big/?limit=3&after=/big/0000100")
	if got := names(p); len(got) != 3 || got[0] != "/big/0000101" {
		t.Errorf("a page after the flood: %q", got)
	}
	c := dialRawWS(t, base)
	c.send(`{"type":"list","payload":{"prefix":"/big/","limit":2},"id":1}`)
	if msg, _ := c.read(); !strings.Contains(string(msg), `"next":"/big/0000001"`) {
		t.Errorf("a WebSocket list after the flood: %.200s", msg)
	}
	after := serverMemory() - idle
	t.Logf("after the clients closed: %.1f MiB above idle", float64(after)/(1<<20))
}

// TestQueuedCursorsEnd: a listing or a state queued on a WebSocket holds
// a snapshot from the moment it is asked (wsConn.list, Subscribe); it
// must end it when it ends, however it ends: read to its end, replaced
// by a newer state of its subscription, or dropped with its connection.
// A snapshot left open makes every later transaction keep the versions
// it replaces, for no reader, up to undoBudget (64 MiB), and each
// listing's reads then walk all of that (snapshots.gone).
func TestQueuedCursorsEnd(t *testing.T) {
	srv, base := newTestServer(t)
	value := `"` + strings.Repeat("v", 800_000) + `"`
	for i := range 20 { // 16 MB: more than the sockets' buffers take
		srv.store.Set(fmt.Sprintf("/big/%02d", i), value, 0)
	}
	// txns commits transactions and reports whether the store keeps
	// anything for the snapshots.
	undoAfterTxns := func() int64 {
		for i := range 100 {
			srv.store.Commit(&txn{ops: []op{{key: "/t/a", value: strconv.Itoa(i)}, {key: "/t/b", value: strconv.Itoa(i)}}})
		}
		srv.store.snaps.mu.RLock()
		defer srv.store.snaps.mu.RUnlock()
		return srv.store.snaps.held
	}
	blocked := func() net.Conn {
		conn, _ := dialRaw(t, base) // it reads nothing, for now
		conn.Write(clientFrame(true, opText, []byte(`{"type":"list","payload":{"prefix":"/big/"},"id":"big"}`)))
		return conn
	}

	t.Run("connection closed", func(t *testing.T) {
		conn := blocked()
		for _, msg := range []string{
			`{"type":"list","payload":{"prefix":"/big/"}}`,
			`{"type":"list","payload":{"prefix":"/big/","limit":5}}`,
			`{"type":"subscribe","payload":{"key":"/big/","initial":true}}`,
			`{"type":"subscribe","payload":{"key":"/t/","since":1}}`,
		} {
			conn.Write(clientFrame(true, opText, []byte(msg)))
		}
		waitFor(t, "the lists and states to be queued", func() bool { return openSnapshots(srv.store) == 5 })
		conn.Close()
		// Once the server counts it closed, its queue is closed (Close
		// closes the queue first).
		waitFor(t, "the WebSocket to close", func() bool { return srv.metrics.ws.Load() == 0 })
		if n := openSnapshots(srv.store); n != 0 {
			t.Errorf("%d snapshots open after the connection closed; want 0: the lists and states queued behind the first keep theirs", n)
		}
		if held := undoAfterTxns(); held != 0 {
			t.Errorf("after 100 transactions the store keeps %d bytes of old versions for no reader; want 0", held)
		}
	})

	t.Run("state replaced", func(t *testing.T) {
		ss := &srv.store.snaps
		ss.mu.Lock()
		clear(ss.active) // what the subtest before left
		ss.pruneLocked()
		ss.mu.Unlock()
		conn := blocked()
		// The same subscription asks twice: the second state replaces
		// the first, still queued.
		for range 2 {
			conn.Write(clientFrame(true, opText, []byte(`{"type":"subscribe","payload":{"key":"/t/","initial":true}}`)))
		}
		conn.Write(clientFrame(true, opText, []byte(`{"type":"get","payload":{"key":"/t/a"},"id":"get"}`)))
		waitFor(t, "the states to be queued", func() bool { return openSnapshots(srv.store) >= 2 })
		c := &rawWS{t, conn, bufio.NewReader(conn)}
		synced := 0
		for {
			msg, _ := c.read()
			if strings.Contains(string(msg), `"type":"synced"`) {
				synced++
			}
			if strings.Contains(string(msg), `"id":"get"`) {
				break
			}
		}
		if synced != 1 {
			t.Errorf("%d synced; want 1 (the second state replaced the first)", synced)
		}
		if n := openSnapshots(srv.store); n != 0 {
			t.Errorf("%d snapshots open once everything asked is answered; want 0: the state replaced in the queue keeps its own", n)
		}
		if held := undoAfterTxns(); held != 0 {
			t.Errorf("after 100 transactions the store keeps %d bytes of old versions for no reader; want 0", held)
		}
	})
}

// TestLargeValuesBounded: a client that reads nothing of a listing or a
// state over a prefix of large values holds, on the server, what SPEC 10
// allows a connection (its bound, 4 MiB, or one maximum-size value: 1
// MiB here) and not what 256 keys of the prefix weigh: a read of the
// store must stop at a number of bytes, not only at 256 keys. Here the
// prefix holds 300 keys of 256 KB (one value shared by all, so that the
// store itself weighs little); 256 of them are 64 MB.
func TestLargeValuesBounded(t *testing.T) {
	srv, base := newTestServer(t)
	value := `"` + strings.Repeat("v", 256_000) + `"`
	for i := range 300 {
		srv.store.Set(fmt.Sprintf("/big/%03d", i), value, 0)
	}
	const bound = 4<<20 + 1<<20 + 3<<20 // the connection's bound, a maximum-size value, and slack
	for _, tt := range []struct{ name, request string }{
		{"HTTP listing", "GET /big/ HTTP/1.1\r\nHost: x\r\n\r\n"},
		{"WebSocket list", `{"type":"list","payload":{"prefix":"/big/"}}`},
		{"WebSocket state", `{"type":"subscribe","payload":{"key":"/big/","initial":true}}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			waitFor(t, "the subtest before to end", func() bool { return openSnapshots(srv.store) == 0 })
			before := serverMemory()
			var conn net.Conn
			if strings.HasPrefix(tt.request, "GET") {
				c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
				if err != nil {
					t.Fatal(err)
				}
				conn = c
				io.WriteString(conn, tt.request)
			} else {
				conn, _ = dialRaw(t, base)
				conn.Write(clientFrame(true, opText, []byte(tt.request)))
			}
			defer conn.Close()
			conn.(*net.TCPConn).SetReadBuffer(4096) // and it reads nothing
			untilQuiet(t)
			var held int64
			for range 10 {
				held = max(held, serverMemory()-before)
			}
			t.Logf("%s of 300 keys of 256 KB, never read: %.1f MiB of the server's memory", tt.name, float64(held)/(1<<20))
			if held > bound {
				t.Errorf("%s never read holds %d MiB on the server; want at most %d MiB", tt.name, held>>20, bound>>20)
			}
		})
	}
}

// TestSnapshotLost: what the store keeps for a listing or state in
// progress is bounded (undoBudget); past it, the oldest point is lost,
// and what reads at it ends truly, never passes for whole: an HTTP
// listing is cut short (no final chunk), a WebSocket list closes its
// connection with 1011, and a state goes on as a reset and the whole
// state as of now, after which the client's view is the store's. Each
// case blocks a client that reads nothing in its first read of the
// store (256 keys of 60 KB), then commits transactions until its point
// is lost, then reads.
func TestSnapshotLost(t *testing.T) {
	old := undoBudget
	t.Cleanup(func() { undoBudget = old }) // after the server's own cleanup
	undoBudget = 64 << 10
	srv, base := newTestServer(t)
	value := `"` + strings.Repeat("v", 60_000) + `"`
	for i := range 300 {
		srv.store.Set(fmt.Sprintf("/big/%03d", i), value, 0)
	}
	// loseAll commits transactions on two keys under /big/ until every
	// snapshot open when it began is lost. (Not until none is open: a
	// state whose point was lost opens another as it starts again, which
	// more transactions would lose too.)
	round := 0
	loseAll := func() {
		t.Helper()
		pad := strings.Repeat("p", 1000)
		srv.store.snaps.mu.RLock()
		open := slices.Collect(maps.Keys(srv.store.snaps.active))
		srv.store.snaps.mu.RUnlock()
		waitFor(t, "the snapshots to be lost", func() bool {
			round++
			srv.store.Commit(&txn{ops: []op{
				{key: "/big/t1", value: fmt.Sprintf(`"%d%s"`, round, pad)},
				{key: "/big/t2", value: fmt.Sprintf(`"%d%s"`, -round, pad)},
			}})
			for _, sn := range open {
				if !sn.lost.Load() && !sn.closed.Load() {
					return false
				}
			}
			return true
		})
	}

	t.Run("HTTP listing", func(t *testing.T) {
		conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "GET /big/ HTTP/1.1\r\nHost: x\r\n\r\n")
		waitFor(t, "the listing to start", func() bool { return openSnapshots(srv.store) == 1 })
		loseAll()
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		if err == nil {
			t.Errorf("a listing whose point was lost: %d bytes, read to a proper end; want it cut short", n)
		}
		t.Logf("%d bytes, then %v", n, err)
	})

	t.Run("WebSocket list", func(t *testing.T) {
		c := dialRawWS(t, base)
		c.send(`{"type":"list","payload":{"prefix":"/big/"},"id":1}`)
		waitFor(t, "the listing to start", func() bool { return openSnapshots(srv.store) == 1 })
		loseAll()
		var got []byte
		for {
			c.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			var h [2]byte
			if _, err := io.ReadFull(c.r, h[:]); err != nil {
				t.Fatalf("after %d bytes of the list: %v; want a close frame", len(got), err)
			}
			n := int(h[1] & 0x7f)
			switch n {
			case 126:
				var ext [2]byte
				io.ReadFull(c.r, ext[:])
				n = int(ext[0])<<8 | int(ext[1])
			case 127:
				var ext [8]byte
				io.ReadFull(c.r, ext[:])
				n = 0
				for _, b := range ext {
					n = n<<8 | int(b)
				}
			}
			payload := make([]byte, n)
			io.ReadFull(c.r, payload)
			switch h[0] & 0x0f {
			case opPing:
				c.conn.Write(clientFrame(true, opPong, payload))
				continue
			case opText, opContinuation:
				got = append(got, payload...)
				continue
			}
			code := int(payload[0])<<8 | int(payload[1])
			if code != closeInternal || !strings.Contains(string(payload[2:]), "list again") {
				t.Errorf("close %d %q; want 1011 saying to list again", code, payload[2:])
			}
			if json.Valid(got) {
				t.Errorf("the %d bytes before the close are a whole message", len(got))
			}
			return
		}
	})

	t.Run("state", func(t *testing.T) {
		c := dialRawWS(t, base)
		c.send(`{"type":"subscribe","payload":{"key":"/big/","initial":true}}`)
		waitFor(t, "the state to start", func() bool { return openSnapshots(srv.store) == 1 })
		loseAll()
		view := map[string]held{}
		resets := 0
		for synced := false; !synced; {
			msg, _ := c.read()
			ev := decodeWS(t, string(msg))
			switch ev.Type {
			case "reset":
				resets++
				clear(view)
			case "value":
				view[ev.Payload.Key] = held{string(ev.Payload.Value), ev.Payload.Revision}
			case "synced":
				synced = true
			}
		}
		// Then the last transaction, to know every change before is in.
		loseAll()
		for {
			ev := decodeWS(t, string(must(c.read())))
			if ev.Type == "value" {
				view[ev.Payload.Key] = held{string(ev.Payload.Value), ev.Payload.Revision}
			}
			if ev.Payload.Key == "/big/t2" && strings.HasPrefix(string(ev.Payload.Value), fmt.Sprintf(`"%d`, -round)) {
				break
			}
		}
		if resets != 1 {
			t.Errorf("%d resets; want 1, when the point was lost", resets)
		}
		if d := diffViews(view, storeView(t, base, "/big/")); d != "" {
			t.Errorf("the view after a state whose point was lost differs from the store:%.500s", d)
		}
	})
}

func must(b []byte, _ int) []byte { return b }
