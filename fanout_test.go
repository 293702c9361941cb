package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestMain lets the fan-out load test run each server in a child process
// of its own (this test binary again), so that the server's memory is
// measured apart from the 5,000 clients'.
func TestMain(m *testing.M) {
	switch mode := os.Getenv("ATOMKV_CHILD"); mode {
	case "":
	case "main": // the real main, for the signal test
		os.Args = []string{"atomkv", "-addr", "127.0.0.1:0"}
		main()
		return
	default:
		childServer(mode)
		return
	}
	os.Exit(m.Run())
}

// childServer serves on 127.0.0.1, prints "addr=<address>", then answers
// each "mem" line on stdin with "mem <heap+stack bytes in use>", and exits
// when stdin closes.
func childServer(mode string) {
	if v, err := strconv.ParseInt(os.Getenv("ATOMKV_TEST_WS_BOUND"), 10, 64); err == nil {
		wsBound = v // to show what the bound holds back
	}
	if path := os.Getenv("ATOMKV_CPUPROFILE"); path != "" {
		f, err := os.Create(path + "." + mode)
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer pprof.StopCPUProfile()
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	out := &lockedWriter{w: os.Stdout}
	done := make(chan struct{})
	if mode == "atomkv" {
		go func() {
			defer close(done)
			if err := run(ctx, []string{"-addr", "127.0.0.1:0"}, os.Getenv, out); err != nil {
				fmt.Fprintln(os.Stderr, err)
			}
		}()
	} else {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		hs := &http.Server{Handler: newBareBroadcast()}
		go hs.Serve(ln)
		fmt.Fprintf(out, "msg=listening addr=%s\n", ln.Addr())
		go func() { <-ctx.Done(); hs.Close(); close(done) }()
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Fprintf(out, "mem %d heap %d stack %d goroutines %d\n", ms.HeapInuse+ms.StackInuse, ms.HeapInuse, ms.StackInuse, runtime.NumGoroutine())
	}
	cancel()
	<-done
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// bareBroadcast is the yardstick: the plain net/http SSE broadcast loop,
// one goroutine per stream and one write + flush per event. POST sends
// the body to every stream; a stream whose buffer is full misses it.
type bareBroadcast struct {
	mu   sync.Mutex
	subs map[chan []byte]bool
}

func newBareBroadcast() *bareBroadcast { return &bareBroadcast{subs: map[chan []byte]bool{}} }

func (b *bareBroadcast) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == "POST" {
		body, _ := io.ReadAll(r.Body)
		b.mu.Lock()
		for ch := range b.subs {
			select {
			case ch <- body:
			default:
			}
		}
		b.mu.Unlock()
		return
	}
	ch := make(chan []byte, 64)
	b.mu.Lock()
	b.subs[ch] = true
	b.mu.Unlock()
	defer func() { b.mu.Lock(); delete(b.subs, ch); b.mu.Unlock() }()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Write([]byte("retry: 2000\n\n"))
	rc := http.NewResponseController(w)
	rc.Flush()
	for {
		select {
		case data := <-ch:
			fmt.Fprintf(w, "id: /k:0\ndata: %s\n\n", data)
			if rc.Flush() != nil {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

// child is a server running in a child process.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines *bufio.Scanner
	addr  string
}

// startChild runs a server in a child process; env adds variables, such
// as ATOMKV_<FLAG> settings.
func startChild(t *testing.T, mode string, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "ATOMKV_CHILD="+mode), env...)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, stdin: stdin, lines: bufio.NewScanner(stdout)}
	for c.lines.Scan() {
		if _, a, ok := strings.Cut(c.lines.Text(), "addr="); ok {
			c.addr = strings.Fields(a)[0]
			break
		}
	}
	if c.addr == "" {
		t.Fatal("child server did not start")
	}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	return c
}

func (c *child) mem() uint64 {
	fmt.Fprintln(c.stdin, "mem")
	for c.lines.Scan() {
		var n uint64
		if _, err := fmt.Sscanf(c.lines.Text(), "mem %d", &n); err == nil {
			return n
		}
	}
	return 0
}

// fanout is what one run of the load measured.
type fanout struct {
	delivered, expected int64
	converged           int
	p50, p99            time.Duration
	postP99             time.Duration // until the server answered an update
	memPerSub           float64
}

// runFanout connects subs clients to the child's /k, over SSE or, with
// ws, as WebSocket subscribers; sends updates POSTs of {"t": <send time>,
// "i": <n>} to /k; and waits for every client to see the last one (or
// gives up after a while).
func runFanout(t *testing.T, c *child, subs, updates int, every time.Duration, ws bool) fanout {
	base := c.mem()
	type client struct {
		last      atomic.Int64
		delivered atomic.Int64
		latencies []time.Duration
	}
	clients := make([]*client, subs)
	var ready, wg sync.WaitGroup
	var conns []net.Conn
	for i := range clients {
		cl := &client{}
		cl.last.Store(-1)
		clients[i] = cl
		conn, err := net.Dial("tcp", c.addr)
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		conns = append(conns, conn)
		ready.Add(1)
		wg.Add(1)
		// An update arrives as {"t":<ns>,"i":<n>}, parsed by hand: the
		// clients share the CPU with the server and must cost little.
		update := func(data []byte) {
			tpart, ipart, _ := bytes.Cut(data, []byte(`,"i":`))
			sent, _ := strconv.ParseInt(string(tpart), 10, 64)
			end := bytes.IndexByte(ipart, '}')
			n, _ := strconv.ParseInt(string(ipart[:max(end, 0)]), 10, 64)
			cl.latencies = append(cl.latencies, time.Duration(time.Now().UnixNano()-sent))
			cl.delivered.Add(1)
			cl.last.Store(n)
		}
		if ws {
			go func() {
				defer wg.Done()
				fanoutWebSocket(conn, ready.Done, update)
			}()
			continue
		}
		fmt.Fprintf(conn, "GET /k HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
		go func() {
			defer wg.Done()
			r := bufio.NewReaderSize(conn, 4096)
			started := false
			for {
				line, err := r.ReadSlice('\n')
				if err != nil {
					if !started {
						ready.Done()
					}
					return
				}
				if !started && strings.HasPrefix(string(line), "retry:") {
					started = true
					ready.Done()
				}
				if data, ok := bytes.CutPrefix(line, []byte(`data: {"t":`)); ok {
					update(data)
				}
			}
		}()
	}
	ready.Wait()
	idle := c.mem()

	// The updates go out on a fixed schedule, pipelined on one connection
	// (so they are applied in order), without waiting for the answers: a
	// sender that waited would slow down with the server it measures and
	// leave that wait out of the latency (coordinated omission).
	sender, err := net.Dial("tcp", c.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	// Send times go to the reader of the answers through atomics: the
	// network between them is no happens-before edge for the race detector.
	sentAt := make([]atomic.Int64, updates)
	postLat := make([]time.Duration, 0, updates)
	postDone := make(chan struct{})
	go func() {
		defer close(postDone)
		br := bufio.NewReader(sender)
		for i := range updates {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			postLat = append(postLat, time.Duration(time.Now().UnixNano()-sentAt[i].Load()))
		}
	}()
	start := time.Now()
	for i := range updates {
		time.Sleep(time.Until(start.Add(time.Duration(i) * every)))
		sentAt[i].Store(time.Now().UnixNano())
		body := fmt.Sprintf(`{"t":%d,"i":%d}`, time.Now().UnixNano(), i)
		if _, err := fmt.Fprintf(sender, "POST /k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body); err != nil {
			t.Fatal(err)
		}
	}
	<-postDone
	deadline := time.Now().Add(30 * time.Second)
	converged := 0
	for time.Now().Before(deadline) {
		converged = 0
		for _, cl := range clients {
			if cl.last.Load() == int64(updates-1) {
				converged++
			}
		}
		if converged == subs {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, conn := range conns {
		conn.Close()
	}
	wg.Wait()
	var f fanout
	var all []time.Duration
	for _, cl := range clients {
		f.delivered += cl.delivered.Load()
		all = append(all, cl.latencies...)
	}
	slices.Sort(all)
	f.expected = int64(subs * updates)
	f.converged = converged
	if len(all) > 0 {
		f.p50, f.p99 = all[len(all)/2], all[len(all)*99/100]
	}
	f.memPerSub = float64(int64(idle)-int64(base)) / float64(subs)
	if len(postLat) > 0 {
		slices.Sort(postLat)
		f.postP99 = postLat[len(postLat)*99/100]
	}
	return f
}

// fanoutWebSocket is a WebSocket subscriber of /k, on the wire by hand
// as the SSE clients are: the handshake, a subscribe message, then the
// frames of the server's messages. It calls ready once subscribed (or
// failed), and update with what follows "value":{"t": in each value.
func fanoutWebSocket(conn net.Conn, ready func(), update func([]byte)) {
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n\r\n")
	r := bufio.NewReaderSize(conn, 4096)
	started := false
	defer func() {
		if !started {
			ready()
		}
	}()
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		if string(line) == "\r\n" {
			break // the end of the 101 response
		}
	}
	// A client frame: FIN and text, masked with a zero key, which leaves
	// the payload as it is.
	msg := `{"type":"subscribe","payload":{"key":"/k"},"id":1}`
	conn.Write(append([]byte{0x81, 0x80 | byte(len(msg)), 0, 0, 0, 0}, msg...))
	var payload []byte
	for {
		var h [10]byte
		if _, err := io.ReadFull(r, h[:2]); err != nil {
			return
		}
		n := int(h[1] & 0x7f)
		switch n {
		case 126:
			if _, err := io.ReadFull(r, h[2:4]); err != nil {
				return
			}
			n = int(h[2])<<8 | int(h[3])
		case 127:
			return // no message here is that large
		}
		payload = slices.Grow(payload[:0], n)[:n]
		if _, err := io.ReadFull(r, payload); err != nil {
			return
		}
		if !started && bytes.HasPrefix(payload, []byte(`{"type":"ok"`)) {
			started = true
			ready()
		}
		if _, data, ok := bytes.Cut(payload, []byte(`"value":{"t":`)); ok {
			update(data)
		}
	}
}

// TestLoadFanout: 5,000 subscribers of one key over loopback, 300 updates
// 10 ms apart, against the bare broadcast loop, AtomKV's SSE and AtomKV's
// WebSocket in the same run. It reports and checks convergence (every
// subscriber must end at the final revision: that is correctness, not
// speed) and prints the latency and memory figures for README.md.
func TestLoadFanout(t *testing.T) {
	needLoad(t)
	const subs, updates = 5000, 300
	every := 10 * time.Millisecond
	if v := os.Getenv("ATOMKV_FANOUT_EVERY"); v != "" {
		every, _ = time.ParseDuration(v)
	}
	fmt.Printf("%d subscribers, %d updates %v apart\n", subs, updates, every)
	results := map[string]fanout{}
	for _, run := range []string{"bare", "sse", "websocket"} {
		mode := "atomkv"
		if run == "bare" {
			mode = "bare"
		}
		c := startChild(t, mode)
		f := runFanout(t, c, subs, updates, every, run == "websocket")
		results[run] = f
		fmt.Printf("%-9s: delivered %d/%d, %d/%d subscribers at the final update, latency p50 %v p99 %v (POST answered: p99 %v), %.0f B per idle subscriber\n",
			run, f.delivered, f.expected, f.converged, subs, f.p50.Round(time.Microsecond), f.p99.Round(time.Microsecond), f.postP99.Round(time.Microsecond), f.memPerSub)
		if run != "bare" && f.converged != subs {
			t.Errorf("%s: %d of %d AtomKV subscribers ended at the final revision; want all", run, f.converged, subs)
		}
	}
	a, b, w := results["sse"], results["bare"], results["websocket"]
	fmt.Printf("sse / bare: p99 latency %.2f×, memory per idle subscriber %.2f×\n",
		float64(a.p99)/float64(b.p99), a.memPerSub/b.memPerSub)
	fmt.Printf("websocket / sse: p99 latency %.2f×, memory per idle subscriber %.2f×\n",
		float64(w.p99)/float64(a.p99), w.memPerSub/a.memPerSub)
	if w.memPerSub > 16<<10 {
		t.Errorf("%.0f bytes per idle WebSocket; the bound is 16 KiB", w.memPerSub)
	}
}
