package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// wsClient is a test's WebSocket connection.
type wsClient struct {
	t  testing.TB
	ws *websocket.Conn
}

// dialWS connects to the server at url, sending origin (by default a page
// on localhost: x/net's client always sends one).
func dialWS(t testing.TB, url string, origin string) *wsClient {
	t.Helper()
	if origin == "" {
		origin = "http://localhost/"
	}
	cfg, err := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", origin)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	return &wsClient{t, ws}
}

func (c *wsClient) send(msg string) {
	c.t.Helper()
	if err := websocket.Message.Send(c.ws, msg); err != nil {
		c.t.Fatalf("send %s: %v", msg, err)
	}
}

// recv returns the next message as compact JSON text, with the number of
// a "seq" written "_": it differs from run to run.
func (c *wsClient) recv() string {
	c.t.Helper()
	return seqField.ReplaceAllString(c.recvRaw(), `"seq":_`)
}

var seqField = regexp.MustCompile(`"seq":\d+`)

// recvRaw returns the next message as it came.
func (c *wsClient) recvRaw() string {
	c.t.Helper()
	c.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	var msg string
	if err := websocket.Message.Receive(c.ws, &msg); err != nil {
		c.t.Fatalf("receive: %v", err)
	}
	return msg
}

// roundTrip sends msg and checks the next message is want.
func (c *wsClient) roundTrip(msg, want string) {
	c.t.Helper()
	c.send(msg)
	if got := c.recv(); got != want {
		c.t.Errorf("sent %s\n got %s\nwant %s", msg, got, want)
	}
}

// sync sends a get and reads up to its reply, which proves every message
// sent before it was handled.
func (c *wsClient) sync() {
	c.t.Helper()
	c.send(`{"type":"get","payload":{"key":"/sync"},"id":"sync"}`)
	for c.recv() != `{"type":"no-value","payload":{"key":"/sync"},"id":"sync"}` {
	}
}

// TestWebSocketMessages walks every message type, with and without id,
// over a real connection. Each step lists the messages it must bring, in
// order; a step that must bring none is proved silent by the next step's
// reply coming first.
func TestWebSocketMessages(t *testing.T) {
	url := startServer(t)
	c := dialWS(t, url, "")
	steps := []struct{ send, want string }{
		{`{"type":"get","payload":{"key":"/a"}}`, `{"type":"no-value","payload":{"key":"/a"}}`},
		{`{"type":"get","payload":{"key":"/a"},"id":1}`, `{"type":"no-value","payload":{"key":"/a"},"id":1}`},
		{`{"type":"set","payload":{"key":"/a","value":{"b":[1, 2]}}}`, ""},
		{`{"type":"get","payload":{"key":"/a"}}`, `{"type":"value","payload":{"key":"/a","value":{"b":[1,2]},"revision":0}}`},
		{`{"type":"set","payload":{"key":"/a","value":12345678901234567890},"id":"s1"}`, `{"type":"ok","payload":{"key":"/a","revision":1},"id":"s1"}`},
		{`{"type":"update","payload":{"key":"/a","value":3,"revision":2}}`, `{"type":"ok","payload":{"key":"/a","revision":2}}`},
		{`{"type":"update","payload":{"key":"/a","value":4,"revision":2},"id":{"n":[1]}}`, `{"type":"conflict","payload":{"key":"/a","value":3,"revision":2},"id":{"n":[1]}}`},
		{`{"type":"update","payload":{"key":"/new","value":null,"revision":0}}`, `{"type":"ok","payload":{"key":"/new","revision":0}}`},
		{`{"type":"update","payload":{"key":"/none","value":1,"revision":5}}`, `{"type":"conflict","payload":{"key":"/none","value":null,"revision":-1}}`},
		{`{"type":"delete","payload":{"key":"/a","revision":7}}`, `{"type":"conflict","payload":{"key":"/a","value":3,"revision":2}}`},
		{`{"type":"delete","payload":{"key":"/a"}}`, ""},
		{`{"type":"get","payload":{"key":"/a"}}`, `{"type":"no-value","payload":{"key":"/a"}}`},
		{`{"type":"delete","payload":{"key":"/new","revision":0},"id":2}`, `{"type":"ok","payload":{"key":"/new"},"id":2}`},
		{`{"type":"set","payload":{"key":"/t/x","value":1,"ttl":"1h"}}`, ""},
		{`{"type":"set","payload":{"key":"/t/y","value":2,"ttl":60000}}`, ""},
		{`{"type":"list","payload":{"prefix":"/t/"},"id":3}`, ""}, // checked below: ttl counts down
		{`{"type":"list","payload":{"prefix":"/nothing/"}}`, `{"type":"values","payload":[]}`},
		{`{"type":"subscribe","payload":{"key":"/s/"}}`, ""},
		{`{"type":"set","payload":{"key":"/s/1","value":"x"}}`, `{"type":"value","payload":{"key":"/s/1","value":"x","revision":0,"seq":_}}`},
		{`{"type":"delete","payload":{"key":"/s/1"}}`, `{"type":"no-value","payload":{"key":"/s/1","reason":"deleted","seq":_}}`},
		{`{"type":"unsubscribe","payload":{"key":"/s/"},"id":4}`, `{"type":"ok","payload":{"key":"/s/"},"id":4}`},
		{`{"type":"set","payload":{"key":"/s/2","value":"unseen"}}`, ""},
		{`{"type":"unsubscribe","payload":{"key":"/s/"}}`, ""},
		// The reply is queued before the initial state, so it comes first;
		// the state is tagged 0 (no resume point) until synced.
		{`{"type":"subscribe","payload":{"key":"/s/2","initial":true},"id":5}`,
			`{"type":"ok","payload":{"key":"/s/2"},"id":5}` + "\n" + `{"type":"value","payload":{"key":"/s/2","value":"unseen","revision":0,"seq":_}}` +
				"\n" + `{"type":"synced","payload":{"key":"/s/2","seq":_}}`},
		{`{"type":"subscribe","payload":{"key":"/missing","initial":true}}`, `{"type":"no-value","payload":{"key":"/missing","seq":_}}` +
			"\n" + `{"type":"synced","payload":{"key":"/missing","seq":_}}`},
		{`{"type":"get","payload":{"key":"/zzz"}}`, `{"type":"no-value","payload":{"key":"/zzz"}}`},
	}
	for _, st := range steps {
		c.send(st.send)
		if strings.Contains(st.send, `"list","payload":{"prefix":"/t/"}`) {
			// The ttl counts down; check its shape.
			got := c.recv()
			if !strings.HasPrefix(got, `{"type":"values","payload":[{"key":"/t/x","value":1,"revision":0,"ttl":3`) ||
				!strings.Contains(got, `{"key":"/t/y","value":2,"revision":0,"ttl":`) || !strings.HasSuffix(got, `],"id":3}`) {
				t.Errorf("list: got %s", got)
			}
			continue
		}
		for want := range strings.SplitSeq(st.want, "\n") {
			if want == "" {
				continue
			}
			if got := c.recv(); got != want {
				t.Errorf("sent %s\n got %s\nwant %s", st.send, got, want)
			}
		}
	}
}

// TestKvServerScenario is KvServer's own protocol, verbatim in its
// message shapes: nothing but type, payload and key.
func TestKvServerScenario(t *testing.T) {
	url := startServer(t)
	c := dialWS(t, url, "http://any.example")
	c.send(`{"type":"subscribe","payload":{"key":"/a"}}`)
	c.send(`{"type":"set","payload":{"key":"/a","value":"hello"}}`)
	if got, want := c.recv(), `{"type":"value","payload":{"key":"/a","value":"hello","revision":0,"seq":_}}`; got != want {
		t.Errorf("after set: got %s; want %s", got, want)
	}
	c.send(`{"type":"delete","payload":{"key":"/a"}}`)
	if got, want := c.recv(), `{"type":"no-value","payload":{"key":"/a","reason":"deleted","seq":_}}`; got != want {
		t.Errorf("after delete: got %s; want %s", got, want)
	}
	c.roundTrip(`{"type":"get","payload":{"key":"/b"}}`, `{"type":"no-value","payload":{"key":"/b"}}`)
	c.roundTrip(`{"type":"set","payload":{"key":"/b","value":1,"ttl":"10 parsecs"}}`, `{"type":"error","payload":"invalid TTL \"10 parsecs\": unknown unit \"parsecs\""}`)
	c.roundTrip(`{"type":"frobnicate","payload":{"key":"/b"}}`, `{"type":"error","payload":"unknown message type \"frobnicate\": want get, set, update, delete, subscribe, unsubscribe, list or txn"}`)
	c.roundTrip(`{"type":"get","payload":{"key":"/b"}}`, `{"type":"no-value","payload":{"key":"/b"}}`)
}

// TestWebSocketBadMessages: every bad message gets an error naming what
// was wrong, with its id if it had one, and the connection goes on.
func TestWebSocketBadMessages(t *testing.T) {
	url := startServer(t, "-max-value-bytes", "1000")
	c := dialWS(t, url, "")
	c.send(`{"type":"set","payload":{"key":"/keep","value":"safe"}}`)
	for _, tt := range []struct{ send, msg string }{
		{`not json`, `invalid message: not JSON`},
		{`[1,2]`, `invalid message: want a JSON object`},
		{`"get"`, `invalid message: want a JSON object`},
		{`{"payload":{"key":"/a"}}`, `invalid message: missing \"type\"`},
		{`{"type":5,"payload":{}}`, `invalid message: \"type\" must be a string`},
		{`{"type":"get"}`, `get: missing \"payload\"`},
		{`{"type":"get","payload":"/a"}`, `get: \"payload\" must be an object`},
		{`{"type":"get","payload":{}}`, `missing \"key\"`},
		{`{"type":"get","payload":{"key":5}}`, `get: \"key\" must be a string`},
		{`{"type":"get","payload":{"key":"a\u0000b"}}`, `invalid key \"a\\x00b\": control character U+0000`},
		{`{"type":"get","payload":{"key":""}}`, `invalid key \"\": empty`},
		{`{"type":"set","payload":{"key":"/a//b","value":1}}`, `invalid key \"/a//b\"`},
		{`{"type":"set","payload":{"key":"/a"}}`, `missing \"value\"`},
		{`{"type":"set","payload":{"key":"/a","value":1,"ttl":0}}`, `invalid TTL 0: must be positive`},
		{`{"type":"set","payload":{"key":"/a","value":1,"ttl":"-5s"}}`, `invalid TTL \"-5s\": must be positive`},
		{`{"type":"set","payload":{"key":"/a","value":1,"ttl":true}}`, `invalid TTL true`},
		{`{"type":"set","payload":{"key":"/a","value":"` + strings.Repeat("x", 2000) + `"}}`, `value larger than 1000 bytes`},
		{`{"type":"update","payload":{"key":"/a","value":1}}`, `update: missing \"revision\"`},
		{`{"type":"update","payload":{"key":"/a","value":1,"revision":"1"}}`, `update: \"revision\" must be an integer`},
		{`{"type":"update","payload":{"key":"/a","value":1,"revision":1.5}}`, `update: \"revision\" must be an integer`},
		{`{"type":"subscribe","payload":{}}`, `subscribe: missing \"key\"`},
		{`{"type":"subscribe","payload":{"key":"/a//b/"}}`, `invalid path \"/a//b/\": empty component`},
		{`{"type":"subscribe","payload":{"key":"room/../"}}`, `invalid path \"room/../\": \"..\" component`},
		{`{"type":"subscribe","payload":{"key":"/a","initial":"yes"}}`, `subscribe: \"initial\" must be true or false`},
		{`{"type":"list","payload":{"prefix":"/a/./"}}`, `invalid path \"/a/./\": \".\" component`},
		{`{"type":"nope","payload":{},"id":[7]}`, `unknown message type \"nope\"`},
	} {
		c.send(tt.send)
		got := c.recv()
		if !strings.HasPrefix(got, `{"type":"error","payload":"`) || !strings.Contains(got, tt.msg) {
			t.Errorf("sent %.80s\n got %s\nwant an error containing %s", tt.send, got, tt.msg)
		}
		if strings.Contains(tt.send, `"id":[7]`) && !strings.HasSuffix(got, `,"id":[7]}`) {
			t.Errorf("error did not echo the id: %s", got)
		}
	}
	c.roundTrip(`{"type":"get","payload":{"key":"/keep"}}`, `{"type":"value","payload":{"key":"/keep","value":"safe","revision":0}}`)
}

// TestWebSocketOpList: the error that answers an unknown type names every
// type of the op table, in its order, and each type it names is one the
// server answers (with an error about its payload, not its type).
func TestWebSocketOpList(t *testing.T) {
	url := startServer(t)
	c := dialWS(t, url, "")
	c.send(`{"type":"nope","payload":{}}`)
	got := c.recv()
	list := got[strings.Index(got, "want ")+len("want ") : strings.LastIndex(got, `"`)]
	types := strings.Split(strings.Replace(list, " or ", ", ", 1), ", ")
	var want []string
	for _, op := range wsOps {
		want = append(want, op.typ)
	}
	if !slices.Equal(types, want) {
		t.Fatalf("unknown type: %s; want it to name %q", got, want)
	}
	for _, typ := range types {
		t.Run(typ, func(t *testing.T) {
			c.send(`{"type":"` + typ + `","payload":{"key":""},"id":1}`)
			if got := c.recv(); strings.Contains(got, "unknown message type") {
				t.Errorf("%s: %s", typ, got)
			}
		})
	}
}

// TestItemEverywhere: a key's version is one JSON object wherever it is
// sent (appendItem, appendVersion): an HTTP listing, and over the
// WebSocket an event, a get, a list and a conflict carry the same key,
// value and revision, byte for byte; all but the event its TTL (which the
// HTTP conflict carries too, as X-TTL), and the event its seq.
func TestItemEverywhere(t *testing.T) {
	url := startServer(t)
	const key, value = `/item/q"uote`, `{"b":1,"a":[12345678901234567890,"é"]}`
	version := `"key":"/item/q\"uote","value":` + value + `,"revision":0`
	c := dialWS(t, url, "")
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/item/"},"id":0}`, `{"type":"ok","payload":{"key":"/item/"},"id":0}`)
	c.send(`{"type":"set","payload":{"key":` + strconv.Quote(key) + `,"value":` + value + `,"ttl":"1h"},"id":1}`)
	event := c.recvRaw() // before the set's ok (SPEC 5, Order)
	if got, want := c.recv(), `{"type":"ok","payload":{"key":`+strconv.Quote(key)+`,"revision":0},"id":1}`; got != want {
		t.Fatalf("set: %s; want %s", got, want)
	}
	ttl := regexp.MustCompile(`^,"ttl":\d+}$`)
	ask := func(msg string) func() string {
		return func() string { c.send(msg); return c.recvRaw() }
	}
	for _, tt := range []struct {
		name, before, after string
		tail                *regexp.Regexp // what follows the version's members
		got                 func() string
	}{
		{"event", `{"type":"value","payload":{`, `}`, regexp.MustCompile(`^,"seq":\d+}$`), func() string { return event }},
		{"HTTP listing", `[{`, `]`, ttl, func() string { return do(t, "GET", url+"/item/", "").body }},
		{"get", `{"type":"value","payload":{`, `,"id":2}`, ttl,
			ask(`{"type":"get","payload":{"key":` + strconv.Quote(key) + `},"id":2}`)},
		{"list", `{"type":"values","payload":[{`, `],"id":3}`, ttl,
			ask(`{"type":"list","payload":{"prefix":"/item/"},"id":3}`)},
		{"conflict", `{"type":"conflict","payload":{`, `,"id":4}`, ttl,
			ask(`{"type":"update","payload":{"key":` + strconv.Quote(key) + `,"value":2,"revision":7},"id":4}`)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.got()
			rest, ok := strings.CutPrefix(got, tt.before+version)
			if ok {
				rest, ok = strings.CutSuffix(rest, tt.after)
			}
			if !ok || !tt.tail.MatchString(rest) {
				t.Errorf("got %s; want %s%s%s%s", got, tt.before, version, tt.tail, tt.after)
			}
		})
	}
}

// TestWebSocketOrigins: any origin by default, and clients without one;
// with -origins, only those listed (and still clients without one).
func TestWebSocketOrigins(t *testing.T) {
	url := startServer(t, "-origins", "http://good.example")
	dialWS(t, url, "http://good.example")
	cfg, _ := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", "http://evil.example")
	if ws, err := websocket.DialConfig(cfg); err == nil {
		ws.Close()
		t.Error("a WebSocket from a disallowed origin was accepted")
	}
	// x/net's client always sends an Origin; a CLI tool may not.
	for origin, want := range map[string]string{"": "101", "Origin: http://evil.example\r\n": "403"} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n", origin)
		status, _ := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if !strings.Contains(status, " "+want+" ") {
			t.Errorf("handshake with %q: got %q; want %s", origin, status, want)
		}
	}
}

// TestWebSocketAndSSESameState: a WebSocket subscriber and an SSE
// subscriber of one prefix end with the same state after concurrent
// writes from HTTP and WebSocket clients.
func TestWebSocketAndSSESameState(t *testing.T) {
	url := startServer(t)
	sub := dialWS(t, url, "")
	sub.send(`{"type":"subscribe","payload":{"key":"/m/"},"id":0}`)
	sub.recv()
	sse := subscribe(t, url, "/m/")
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c *wsClient
			if w%2 == 0 {
				c = dialWS(t, url, "")
			}
			for i := range 100 {
				key := fmt.Sprintf("/m/%d", (i+w)%10)
				if c != nil {
					c.send(fmt.Sprintf(`{"type":"set","payload":{"key":%q,"value":%d}}`, key, i))
				} else {
					do(t, "POST", url+key, fmt.Sprint(i))
				}
			}
			if c != nil {
				c.sync()
			}
		}()
	}
	wg.Wait()
	final := map[string]int64{}
	for _, it := range listAll(t, url) {
		final[it.Key] = it.Revision
	}
	got := map[string]int64{}
	for !sameRevisions(got, final) {
		var ev struct {
			Type    string
			Payload struct {
				Key      string
				Revision int64
			}
		}
		json.Unmarshal([]byte(sub.recvRaw()), &ev)
		got[ev.Payload.Key] = ev.Payload.Revision
	}
	last := map[string]int64{}
	for !sameRevisions(last, final) {
		ev := next(t, sse)
		last[ev.key] = ev.rev
	}
}

func TestWebSocketExpiry(t *testing.T) {
	url := startServer(t)
	c := dialWS(t, url, "")
	c.send(`{"type":"subscribe","payload":{"key":"/e"}}`)
	c.send(`{"type":"set","payload":{"key":"/e","value":1,"ttl":30}}`)
	if got := c.recv(); got != `{"type":"value","payload":{"key":"/e","value":1,"revision":0,"seq":_}}` {
		t.Errorf("got %s", got)
	}
	if got := c.recv(); got != `{"type":"no-value","payload":{"key":"/e","reason":"expired","seq":_}}` {
		t.Errorf("expiry: got %s; want no-value with reason expired", got)
	}
}

// TestWebSocketShutdown: stopping the server closes every WebSocket, and
// with -log-requests the upgrade still works (the logger's writer must
// pass the hijack on).
func TestWebSocketShutdown(t *testing.T) {
	url, stop := startStoppable(t, "-log-requests")
	var clients []*wsClient
	for range 20 {
		c := dialWS(t, url, "")
		c.roundTrip(`{"type":"subscribe","payload":{"key":"/"},"id":1}`, `{"type":"ok","payload":{"key":"/"},"id":1}`)
		clients = append(clients, c)
	}
	stop()
	for _, c := range clients {
		c.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		var msg string
		if err := websocket.Message.Receive(c.ws, &msg); err != io.EOF {
			t.Errorf("after shutdown: got %q, %v; want EOF", msg, err)
		}
	}
}

// TestKvServerREST: the opt-in REST shape and its status codes, and its
// absence without the flag.
func TestKvServerREST(t *testing.T) {
	url := startServer(t, "-kvserver-rest", "/storage")
	steps := []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"GET", "/storage/foo", "", 204, ""},
		{"POST", "/storage/foo", `{"value": {"a": 1}}`, 202, ""},
		{"GET", "/storage/foo", "", 200, `{"value":{"a":1}}`},
		{"GET", "/foo", "", 200, `{"a":1}`}, // the same key natively
		{"POST", "/storage/a/b", `{"value": null, "ttl": "10 hours 1m 5s"}`, 202, ""},
		{"GET", "/storage/a/b", "", 200, `{"value":null}`},
		{"POST", "/storage/n", `{"value": 1, "ttl": 60000}`, 202, ""},
		{"POST", "/storage/bad", `{"value": 1, "ttl": "soon"}`, 400, ""},
		{"POST", "/storage/bad", `{"ttl": 5}`, 400, ""},
		{"POST", "/storage/bad", `{"value": }`, 400, ""},
		{"POST", "/storage/bad", `[1]`, 400, ""},
		{"POST", "/storage/a%01b", `{"value": 1}`, 400, ""},
		{"GET", "/storage/a/../b", "", 400, ""},
		{"DELETE", "/storage/foo", "", 200, ""},
		{"DELETE", "/storage/foo", "", 200, ""},
		{"GET", "/storage/foo", "", 204, ""},
	}
	for _, st := range steps {
		resp := do(t, st.method, url+st.path, st.body)
		if resp.code != st.code || (st.want != "" && resp.body != st.want) {
			t.Errorf("%s %s %s: got %d %s; want %d %s", st.method, st.path, st.body, resp.code, resp.body, st.code, st.want)
		}
	}
	if ttl := do(t, "GET", url+"/n", "").header.Get("X-TTL"); len(ttl) != 5 {
		t.Errorf("a REST ttl of 60000: X-TTL %q", ttl)
	}

	plain := startServer(t)
	if resp := do(t, "POST", plain+"/storage/foo", `{"value":1}`); resp.code != 200 {
		t.Errorf("without the flag, /storage/foo is an ordinary key: got %d", resp.code)
	}
	if resp := do(t, "GET", plain+"/storage/foo", ""); resp.body != `{"value":1}` {
		t.Errorf("without the flag: got %s; want the stored value as it is", resp.body)
	}
	if _, err := parseConfig([]string{"-kvserver-rest", "storage/"}, func(string) string { return "" }, io.Discard); err == nil {
		t.Error("-kvserver-rest storage/: no error")
	}
}

// FuzzDecodeMessage: any frame gets either an error or valid replies,
// never a panic, and every reply is a JSON object of a known type.
func FuzzDecodeMessage(f *testing.F) {
	for _, s := range []string{
		`{"type":"get","payload":{"key":"/a"}}`,
		`{"type":"set","payload":{"key":"/a","value":[1,{"b":null}],"ttl":"1h"},"id":1}`,
		`{"type":"update","payload":{"key":"/a","value":1,"revision":0}}`,
		`{"type":"delete","payload":{"key":"/a","revision":3},"id":"x"}`,
		`{"type":"subscribe","payload":{"key":"/a/","initial":true}}`,
		`{"type":"subscribe","payload":{"key":"a/","since":12345}}`, `{"type":"subscribe","payload":{"key":"/","since":"x"}}`,
		`{"type":"list","payload":{"prefix":"/"}}`,
		`{"type":1}`, `[]`, `nul`, `{"type":"get","payload":{"key":"/\u00e9"}}`,
	} {
		f.Add([]byte(s))
	}
	cfg, _ := parseConfig(nil, func(string) string { return "" }, io.Discard)
	srv, _ := newServer(cfg, discardLogger())
	known := []string{"value", "no-value", "ok", "conflict", "values", "error", "synced", "reset"}
	f.Fuzz(func(t *testing.T, frame []byte) {
		c := &wsConn{s: srv, st: &stream{}, subs: map[string]*subscription{}} // no writer: replies stay queued
		c.handle(frame)
		for _, sub := range c.subs {
			srv.store.Unsubscribe(sub)
		}
		batch, _ := c.st.q.drain()
		for _, ev := range batch {
			var msg []byte
			switch ev.kind {
			case evGone, evHeartbeat:
				continue
			case evReply:
				if ev.reply.empty() {
					continue // a place in the queue (a subscribe without id), never sent
				}
				msg = ev.reply.append(nil)
			default:
				msg = appendWSEvent(nil, &ev, new(int64))
			}
			var reply struct {
				Type    string
				Payload json.RawMessage
			}
			if err := json.Unmarshal(msg, &reply); err != nil || !slices.Contains(known, reply.Type) || reply.Payload == nil {
				t.Fatalf("frame %q: reply %s is not a known message", frame, msg)
			}
		}
	})
}

// BenchmarkWebSocketRequests measures how many pipelined requests one
// connection answers: the client sends b.N requests while it reads the
// replies. It frames them beforehand and writes them in large writes, and
// it counts the replies by their frame headers alone, so that its own
// cost (x/net frames a message at a time, with a write(2) each) does not
// hide the server's.
func BenchmarkWebSocketRequests(b *testing.B) {
	url := startServer(b)
	for _, kind := range []string{"get", "set"} {
		b.Run(kind, func(b *testing.B) {
			conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			cfg, _ := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", "http://localhost/")
			if _, err := websocket.NewClient(cfg, conn); err != nil { // the handshake; then raw frames
				b.Fatal(err)
			}
			msg := `{"type":"get","payload":{"key":"/bench"},"id":1}`
			if kind == "set" {
				msg = `{"type":"set","payload":{"key":"/bench","value":{"v":1}},"id":1}`
			}
			// A client frame: FIN and text, masked with a zero key, which
			// leaves the payload as it is.
			frame := append([]byte{0x81, 0x80 | byte(len(msg)), 0, 0, 0, 0}, msg...)
			chunk := bytes.Repeat(frame, 256)
			b.ResetTimer()
			go func() {
				for sent := 0; sent < b.N; sent += 256 {
					if _, err := conn.Write(chunk[:min(256, b.N-sent)*len(frame)]); err != nil {
						return
					}
				}
			}()
			r := bufio.NewReaderSize(conn, 64<<10)
			for range b.N {
				var h [2]byte
				if _, err := io.ReadFull(r, h[:]); err != nil {
					b.Fatal(err)
				}
				n := int(h[1] & 0x7f)
				if n == 126 {
					var ext [2]byte
					io.ReadFull(r, ext[:])
					n = int(ext[0])<<8 | int(ext[1])
				}
				if _, err := r.Discard(n); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkWebSocketFanout: one write reaching 1,000 WebSocket
// subscribers; an operation ends when the last subscriber has it.
func BenchmarkWebSocketFanout(b *testing.B) {
	url := startServer(b)
	const n = 1000
	var subs []*wsClient
	for range n {
		c := dialWS(b, url, "")
		c.roundTrip(`{"type":"subscribe","payload":{"key":"/f"},"id":0}`, `{"type":"ok","payload":{"key":"/f"},"id":0}`)
		subs = append(subs, c)
	}
	w := dialWS(b, url, "")
	b.ResetTimer()
	for i := range b.N {
		w.send(fmt.Sprintf(`{"type":"set","payload":{"key":"/f","value":%d}}`, i))
		var wg sync.WaitGroup
		for _, c := range subs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !strings.Contains(c.recv(), fmt.Sprintf(`"value":%d,`, i)) {
				}
			}()
		}
		wg.Wait()
	}
}

// TestLoadWebSocketMemory reports the server's heap and stacks per idle
// WebSocket connection (each subscribed to a key), with the server in a
// child process so that the clients are not counted.
func TestLoadWebSocketMemory(t *testing.T) {
	needLoad(t)
	const n = 2000
	c := startChild(t, "atomkv")
	base := c.mem()
	for range n {
		ws := dialWS(t, "http://"+c.addr, "")
		ws.roundTrip(`{"type":"subscribe","payload":{"key":"/idle"},"id":0}`, `{"type":"ok","payload":{"key":"/idle"},"id":0}`)
	}
	fmt.Printf("websocket: %.0f B of server memory per idle connection (%d connections)\n", float64(int64(c.mem())-int64(base))/n, n)
}

// TestWebSocketStalled: a WebSocket client that never reads does not slow
// writers, holds at most one pending event per key, and is closed after
// the write timeout.
func TestWebSocketStalled(t *testing.T) {
	srv, url := newTestServer(t, "-write-timeout", "300ms")
	raw, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	raw.(*net.TCPConn).SetReadBuffer(4096)
	cfg, _ := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", "http://localhost/")
	ws, err := websocket.NewClient(cfg, raw)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	websocket.Message.Send(ws, `{"type":"subscribe","payload":{"key":"/"}}`)
	stallUntilClosed(t, srv, url)
}

// TestWebSocketCloseUnsubscribes: a socket's subscriptions go with it.
func TestWebSocketCloseUnsubscribes(t *testing.T) {
	srv, url := newTestServer(t)
	c := dialWS(t, url, "")
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/a/"},"id":1}`, `{"type":"ok","payload":{"key":"/a/"},"id":1}`)
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/"},"id":2}`, `{"type":"ok","payload":{"key":"/"},"id":2}`)
	if n := srv.store.subs.count.Load(); n != 2 {
		t.Fatalf("%d subscriptions; want 2", n)
	}
	c.ws.Close()
	waitFor(t, "the subscriptions to go", func() bool { return srv.store.subs.count.Load() == 0 })
	waitFor(t, "the connection to be released", func() bool { return srv.streams.Len() == 0 })
}

// TestWebSocketFlood: clients that pipeline requests for large replies
// (a get of a 500 KB value, a list of 1,000 keys) and never read them
// cannot grow the server's memory: past a bound the server stops reading
// them, their sends block in TCP, and after -write-timeout they are
// closed. Meanwhile another client's requests and events go on. The
// server runs in a child process, so that its heap is measured alone.
func TestWebSocketFlood(t *testing.T) {
	c := startChild(t, "atomkv", "ATOMKV_WRITE_TIMEOUT=2s")
	url := "http://" + c.addr
	big := `"` + strings.Repeat("x", 500_000) + `"`
	do(t, "POST", url+"/big", big)
	for i := range 1000 {
		do(t, "POST", fmt.Sprintf("%s/l/%04d", url, i), fmt.Sprintf(`{"n":%d,"pad":"%s"}`, i, strings.Repeat("p", 100)))
	}
	idle := c.mem()

	var flooders sync.WaitGroup
	var sent [2]atomic.Int64
	for i, msg := range []string{
		`{"type":"get","payload":{"key":"/big"},"id":1}`,
		`{"type":"list","payload":{"prefix":"/l/"},"id":2}`,
	} {
		raw, err := net.Dial("tcp", c.addr)
		if err != nil {
			t.Fatal(err)
		}
		raw.(*net.TCPConn).SetReadBuffer(4096) // and it reads nothing
		cfg, _ := websocket.NewConfig("ws://"+c.addr+"/", "http://localhost/")
		ws, err := websocket.NewClient(cfg, raw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		flooders.Add(1)
		go func() {
			defer flooders.Done()
			// Until the server closes it; a hang breaker past that.
			ws.SetWriteDeadline(time.Now().Add(60 * time.Second))
			for websocket.Message.Send(ws, msg) == nil {
				sent[i].Add(1)
			}
		}()
	}

	// Another client goes on meanwhile: its round trips and an event.
	other := dialWS(t, url, "")
	key := "/ev"
	other.roundTrip(`{"type":"subscribe","payload":{"key":"/ev"},"id":0}`, `{"type":"ok","payload":{"key":"/ev"},"id":0}`)
	var peak uint64
	for i := range 20 {
		other.roundTrip(fmt.Sprintf(`{"type":"set","payload":{"key":%q,"value":%d},"id":%d}`, key, i, i+1),
			fmt.Sprintf(`{"type":"value","payload":{"key":%q,"value":%d,"revision":%d,"seq":_}}`, key, i, i))
		if got := other.recv(); got != fmt.Sprintf(`{"type":"ok","payload":{"key":%q,"revision":%d},"id":%d}`, key, i, i+1) {
			t.Errorf("another client's set %d during the flood: got %s", i, got)
		}
		peak = max(peak, c.mem())
	}
	flooders.Wait() // the server closed them: their sends fail
	peak = max(peak, c.mem())
	t.Logf("flooders sent %d gets of 500 KB and %d lists before the server stopped reading them, then closed them; server heap %d MiB idle, %d MiB at most during the flood",
		sent[0].Load(), sent[1].Load(), idle>>20, peak>>20)
	if peak > idle+64<<20 {
		t.Errorf("server memory reached %d MiB above idle during the flood; want at most 64", (peak-idle)>>20)
	}
	other.roundTrip(`{"type":"get","payload":{"key":"/ev"}}`, `{"type":"value","payload":{"key":"/ev","value":19,"revision":19}}`)
}

// TestWebSocketBurst: a client that sends 10,000 requests, then reads,
// gets all 10,000 replies, in order, ids intact.
func TestWebSocketBurst(t *testing.T) {
	url := startServer(t)
	c := dialWS(t, url, "")
	const n = 10_000
	c.ws.SetWriteDeadline(time.Now().Add(60 * time.Second)) // a hang breaker
	for i := range n {
		if i%2 == 0 {
			c.send(fmt.Sprintf(`{"type":"set","payload":{"key":"/burst/%d","value":%d},"id":%d}`, i%100, i, i))
		} else {
			c.send(fmt.Sprintf(`{"type":"get","payload":{"key":"/burst/%d"},"id":"g%d"}`, (i-1)%100, i))
		}
	}
	for i := range n {
		got := c.recv()
		var want string
		if i%2 == 0 {
			want = fmt.Sprintf(`{"type":"ok","payload":{"key":"/burst/%d","revision":%d},"id":%d}`, i%100, i/100, i)
		} else {
			want = fmt.Sprintf(`{"type":"value","payload":{"key":"/burst/%d","value":%d,"revision":%d},"id":"g%d"}`, (i-1)%100, i-1, (i-1)/100, i)
		}
		if got != want {
			t.Fatalf("reply %d: got %s; want %s", i, got, want)
		}
	}
}

// TestWebSocketPipelinedOrder: connections that watch the keys they write
// and pipeline 200 updates each get, before the ok of revision r, an event
// of that key of revision r or newer (SPEC 5, "Order"), however the
// events coalesce meanwhile; the other connections' writes to the same
// prefix keep the queues coalescing.
func TestWebSocketPipelinedOrder(t *testing.T) {
	url := startServer(t)
	const conns, updates = 4, 200
	var wg sync.WaitGroup
	for i := range conns {
		c := dialWS(t, url, "")
		c.roundTrip(`{"type":"subscribe","payload":{"key":"/p/"},"id":0}`, `{"type":"ok","payload":{"key":"/p/"},"id":0}`)
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := fmt.Sprintf("/p/%d", i)
			c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second)) // a hang breaker
			// All in flight: nothing is read until the last is sent.
			for r := range updates {
				msg := fmt.Sprintf(`{"type":"update","payload":{"key":%q,"value":%d,"revision":%d},"id":%d}`, key, r, r, r)
				if err := websocket.Message.Send(c.ws, msg); err != nil {
					t.Errorf("send: %v", err)
					return
				}
			}
			seen := int64(-1) // the newest revision of key in an event so far
			for oks := 0; oks < updates; {
				var m struct {
					Type    string
					Payload struct {
						Key      string
						Revision int64
					}
				}
				raw := c.recvRaw()
				if err := json.Unmarshal([]byte(raw), &m); err != nil {
					t.Errorf("%s: %v", raw, err)
					return
				}
				switch {
				case m.Type == "value" && m.Payload.Key == key:
					seen = max(seen, m.Payload.Revision)
				case m.Type == "ok":
					if seen < m.Payload.Revision {
						t.Errorf("%s: the ok of revision %d came before any event of revision %d or newer (newest so far %d)", key, m.Payload.Revision, m.Payload.Revision, seen)
						return
					}
					oks++
				case m.Type != "value":
					t.Errorf("unexpected %s", raw)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// clientFrame is a client's frame: FIN if fin, the opcode, masked (every
// client frame is) with a key that changes every byte.
func clientFrame(fin bool, op byte, payload []byte) []byte {
	b := []byte{op}
	if fin {
		b[0] |= 0x80
	}
	switch n := len(payload); {
	case n < 126:
		b = append(b, 0x80|byte(n))
	case n <= 0xffff:
		b = append(b, 0x80|126, byte(n>>8), byte(n))
	default:
		b = append(b, 0x80|127, 0, 0, 0, 0, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	mask := []byte{0x11, 0x22, 0x33, 0x44}
	b = append(b, mask...)
	for i, c := range payload {
		b = append(b, c^mask[i%4])
	}
	return b
}

// fragments splits msg into n text frames: a text frame, then
// continuations, the last with FIN.
func fragments(msg []byte, n int) [][]byte {
	var frames [][]byte
	for i := range n {
		part := msg[i*len(msg)/n : (i+1)*len(msg)/n]
		op := byte(opContinuation)
		if i == 0 {
			op = opText
		}
		frames = append(frames, clientFrame(i == n-1, op, part))
	}
	return frames
}

// dialRaw opens a WebSocket to url, does the handshake, and returns the
// bare connection, for frames built byte by byte.
func dialRaw(t testing.TB, url string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	cfg, _ := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", "http://localhost/")
	if _, err := websocket.NewClient(cfg, conn); err != nil { // the server sends nothing more until asked
		t.Fatal(err)
	}
	return conn, bufio.NewReader(conn)
}

// readFrame reads a server frame: FIN set, unmasked.
func readFrame(t testing.TB, conn net.Conn, r *bufio.Reader) (op byte, payload []byte, err error) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	if h[0]&0xf0 != 0x80 || h[1]&0x80 != 0 {
		t.Fatalf("server frame header % x: want FIN, no reserved bit, no mask", h)
	}
	n := int(h[1] & 0x7f)
	switch n {
	case 126:
		var ext [2]byte
		io.ReadFull(r, ext[:])
		n = int(ext[0])<<8 | int(ext[1])
	case 127:
		var ext [8]byte
		io.ReadFull(r, ext[:])
		n = int(ext[4])<<24 | int(ext[5])<<16 | int(ext[6])<<8 | int(ext[7])
	}
	payload = make([]byte, n)
	_, err = io.ReadFull(r, payload)
	return h[0] & 0x0f, payload, err
}

// TestWebSocketFrames: RFC 6455 as a server must do it, one row per rule,
// each with frames built byte by byte: a message in one frame or many,
// control frames between fragments answered at once, a close echoed with
// its code, every frame the RFC forbids closed with 1002, a message over
// the limit across its fragments with 1009, bad UTF-8 with 1007, and a
// binary message answered with an error. A row that does not end the
// connection is followed by a request, whose answer shows it still open.
func TestWebSocketFrames(t *testing.T) {
	url := startServer(t)
	get := []byte(`{"type":"get","payload":{"key":"/f"},"id":1}`)
	noValue := `{"type":"no-value","payload":{"key":"/f"},"id":1}`
	padded := append(append(slices.Clone(get[:len(get)-1]), bytes.Repeat([]byte(" "), 2000)...), '}')
	bigSet := []byte(`{"type":"set","payload":{"key":"/big","value":"` + strings.Repeat("x", 1<<20-2) + `"},"id":2}`)
	tooBig := []byte(`{"type":"set","payload":{"key":"/big","value":"` + strings.Repeat("x", 3<<20) + `"},"id":2}`) // past the read limit
	accent := []byte(`{"type":"get","payload":{"key":"/caf` + "\xc3\xa9" + `"},"id":1}`)
	cut := bytes.Index(accent, []byte{0xa9})
	badUTF8 := slices.Clone(accent)
	badUTF8[cut] = 'x' // 0xc3 then 'x'
	closeFrame := func(code int, reason string) []byte {
		return clientFrame(true, opClose, append([]byte{byte(code >> 8), byte(code)}, reason...))
	}
	type want struct {
		op   byte
		text string // the payload, or for a close its code and reason
	}
	reply := func(s string) want { return want{opText, s} }
	closed := func(code int) want { return want{opClose, strconv.Itoa(code)} }
	for _, tt := range []struct {
		name   string
		frames [][]byte
		want   []want
	}{
		{"one frame", [][]byte{clientFrame(true, opText, get)}, []want{reply(noValue)}},
		{"2 fragments", fragments(get, 2), []want{reply(noValue)}},
		{"1000 fragments", fragments(padded, 1000), []want{reply(noValue)}},
		{"empty fragments", [][]byte{clientFrame(false, opText, nil), clientFrame(false, opContinuation, get), clientFrame(true, opContinuation, nil)}, []want{reply(noValue)}},
		{"pings between fragments, answered at once", func() [][]byte {
			f := fragments(get, 3)
			return [][]byte{f[0], clientFrame(true, opPing, []byte("a")), f[1], clientFrame(true, opPing, []byte("bb")), clientFrame(true, opPong, []byte("c")), f[2]}
		}(), []want{{opPong, "a"}, {opPong, "bb"}, reply(noValue)}},
		{"1 MiB value in 64 KB fragments", fragments(bigSet, len(bigSet)/(64<<10)+1), []want{reply(`{"type":"ok","payload":{"key":"/big","revision":0},"id":2}`)}},
		{"UTF-8 split across fragments", [][]byte{clientFrame(false, opText, accent[:cut]), clientFrame(true, opContinuation, accent[cut:])}, []want{reply(`{"type":"no-value","payload":{"key":"/café"},"id":1}`)}},
		{"binary message: error", [][]byte{clientFrame(true, opBinary, get)}, []want{reply(`{"type":"error","payload":"binary message: the protocol is JSON text"}`)}},
		{"over the limit across fragments: 1009", fragments(tooBig, 20), []want{closed(closeTooBig)}},
		{"bad UTF-8 split across fragments: error", [][]byte{clientFrame(false, opText, badUTF8[:cut]), clientFrame(true, opContinuation, badUTF8[cut:])}, []want{reply(`{"type":"error","payload":"invalid message: not valid UTF-8"}`)}},
		{"close reason not UTF-8: 1007", [][]byte{closeFrame(closeNormal, "\xff")}, []want{closed(closeInvalidData)}},
		{"unmasked client frame: 1002", [][]byte{append([]byte{0x81, byte(len(get))}, get...)}, []want{closed(closeProtocol)}},
		{"RSV1: 1002", [][]byte{func() []byte { f := clientFrame(true, opText, get); f[0] |= 0x40; return f }()}, []want{closed(closeProtocol)}},
		{"RSV2: 1002", [][]byte{func() []byte { f := clientFrame(true, opText, get); f[0] |= 0x20; return f }()}, []want{closed(closeProtocol)}},
		{"RSV3: 1002", [][]byte{func() []byte { f := clientFrame(true, opText, get); f[0] |= 0x10; return f }()}, []want{closed(closeProtocol)}},
		{"reserved data opcode: 1002", [][]byte{clientFrame(true, 0x3, get)}, []want{closed(closeProtocol)}},
		{"reserved control opcode: 1002", [][]byte{clientFrame(true, 0xb, nil)}, []want{closed(closeProtocol)}},
		{"control frame over 125 bytes: 1002", [][]byte{clientFrame(true, opPing, make([]byte, 126))}, []want{closed(closeProtocol)}},
		{"fragmented control frame: 1002", [][]byte{clientFrame(false, opPing, []byte("a"))}, []want{closed(closeProtocol)}},
		{"continuation without a start: 1002", [][]byte{clientFrame(true, opContinuation, get)}, []want{closed(closeProtocol)}},
		{"new message inside a fragmented one: 1002", [][]byte{clientFrame(false, opText, get[:5]), clientFrame(true, opText, get)}, []want{closed(closeProtocol)}},
		{"close with a one-byte payload: 1002", [][]byte{clientFrame(true, opClose, []byte{3})}, []want{closed(closeProtocol)}},
		{"close with a code no one may send: 1002", [][]byte{closeFrame(1005, "")}, []want{closed(closeProtocol)}},
		{"close echoed with its code", [][]byte{closeFrame(closeNormal, "bye")}, []want{closed(closeNormal)}},
		{"close with an application code echoed", [][]byte{closeFrame(4000, "")}, []want{closed(4000)}},
		{"close without a code echoed empty", [][]byte{clientFrame(true, opClose, nil)}, []want{{opClose, ""}}},
		{"close between fragments", [][]byte{fragments(get, 2)[0], closeFrame(closeNormal, "")}, []want{closed(closeNormal)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conn, r := dialRaw(t, url)
			conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := conn.Write(bytes.Join(tt.frames, nil)); err != nil {
				t.Fatal(err)
			}
			ended := false
			for _, w := range tt.want {
				op, payload, err := readFrame(t, conn, r)
				if err != nil {
					t.Fatalf("want %d %q: %v", w.op, w.text, err)
				}
				got := string(payload)
				if op == opClose && len(payload) >= 2 {
					got = strconv.Itoa(int(payload[0])<<8 | int(payload[1]))
					ended = true
				} else if op == opClose {
					ended = true
				}
				if op != w.op || got != w.text {
					t.Errorf("got frame %d %q (%q); want %d %q", op, got, payload, w.op, w.text)
				}
			}
			if ended {
				if op, payload, err := readFrame(t, conn, r); err == nil {
					t.Errorf("after the close: frame %d %q; want the connection closed", op, payload)
				}
				return
			}
			conn.Write(clientFrame(true, opText, get))
			if _, payload, err := readFrame(t, conn, r); err != nil || string(payload) != noValue {
				t.Errorf("after the row: %q, %v; want %s", payload, err, noValue)
			}
		})
	}
}

// FuzzWebSocketFrames: whatever bytes a client sends, the reader returns
// a whole text message of valid UTF-8 (or says it is not) or a binary one,
// within the limit, or an error; it never panics, and a close it asks for
// fits a control frame.
func FuzzWebSocketFrames(f *testing.F) {
	get := []byte(`{"type":"get","payload":{"key":"/f"}}`)
	for _, frames := range [][][]byte{
		{clientFrame(true, opText, get)},
		fragments(get, 3),
		{clientFrame(false, opText, get[:3]), clientFrame(true, opPing, []byte("p")), clientFrame(true, opContinuation, get[3:])},
		{clientFrame(true, opBinary, []byte{0xff})},
		{clientFrame(true, opClose, []byte{3, 0xe8})},
		{clientFrame(true, opText, []byte("\xc3")), clientFrame(true, opText, bytes.Repeat([]byte("x"), 300))},
	} {
		f.Add(bytes.Join(frames, nil))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		pongs := 0
		r := &wsReader{r: bufio.NewReader(bytes.NewReader(data)), max: 256, pong: func([]byte) { pongs++ }}
		var buf []byte
		for {
			op, msg, err := r.next(buf)
			buf = msg
			var closing *wsCloseError
			switch {
			case errors.As(err, &closing):
				if frame := appendClose(nil, closing); len(frame) > 2+maxControlPayload {
					t.Fatalf("close frame of %d bytes", len(frame))
				}
				return
			case errors.Is(err, errNotUTF8) && op == opText:
			case err != nil:
				return
			case op != opText && op != opBinary:
				t.Fatalf("message of opcode %d", op)
			case len(msg) > r.max:
				t.Fatalf("message of %d bytes; limit %d", len(msg), r.max)
			case op == opText && !utf8.Valid(msg):
				t.Fatalf("text message %q not valid UTF-8", msg)
			}
		}
	})
}

// TestWebSocketSilentPeer: a connection silent for -heartbeat gets a ping;
// one that answers stays open, one that answers nothing within
// -write-timeout is closed, and counted.
func TestWebSocketSilentPeer(t *testing.T) {
	srv, url := newTestServer(t, "-heartbeat", "50ms", "-write-timeout", "100ms")
	alive, ar := dialRaw(t, url)
	pings := make(chan struct{}, 100)
	texts := make(chan string, 1)
	go func() { // answers every ping
		defer close(texts)
		for {
			alive.SetReadDeadline(time.Now().Add(10 * time.Second))
			op, payload, err := readFrame(t, alive, ar)
			switch {
			case err != nil:
				return
			case op == opPing:
				alive.Write(clientFrame(true, opPong, payload))
				pings <- struct{}{}
			case op == opText:
				texts <- string(payload)
			}
		}
	}()
	gone, gr := dialRaw(t, url)
	if op, _, err := readFrame(t, gone, gr); err != nil || op != opPing {
		t.Fatalf("got frame %d, %v; want a ping", op, err)
	}
	start := time.Now()
	if op, payload, err := readFrame(t, gone, gr); err == nil {
		t.Fatalf("a peer that answers nothing: got frame %d %q; want the connection closed", op, payload)
	}
	t.Logf("closed %v after its ping (-write-timeout 100ms)", time.Since(start))
	if n := srv.metrics.wsSilent.Load(); n != 1 {
		t.Errorf("%d connections counted as silent; want 1", n)
	}
	for range 3 {
		<-pings
	}
	alive.Write(clientFrame(true, opText, []byte(`{"type":"get","payload":{"key":"/f"}}`)))
	if got := <-texts; got != `{"type":"no-value","payload":{"key":"/f"}}` {
		t.Errorf("the answering peer, after 3 pings: got %q", got)
	}
}

// floodWebSocket runs a flooder against the child server: a connection
// that sends the frames of msg(0), msg(1), ... as fast as TCP takes them,
// in large writes, and reads nothing, until the server closes it (after
// -write-timeout of not reading). Meanwhile another client's writes and
// their events go on, each answered (a hang breaker of 10 s; the slowest
// is logged), and the server's heap is sampled. It returns how many
// messages the flooder sent and the heap's peak above idle.
//
// A client that reads nothing with a 4 KB receive buffer can lose the
// server's window updates (Linux drops them while the socket's buffers
// are full), and then sends nothing for a while: the server pings it and
// closes it after -heartbeat + -write-timeout, but the client learns of
// it only at its next zero-window probe, seconds later. So a write
// blocked for 8 s, longer than the server may take, ends the flood, and
// reading what is left shows whether the server has closed it.
func floodWebSocket(t *testing.T, c *child, n int, msg func(i int) string) (sent int, peak int64) {
	t.Helper()
	idle := int64(c.mem())
	conn, _ := dialRaw(t, "http://"+c.addr)
	conn.(*net.TCPConn).SetReadBuffer(4096) // and it reads nothing
	done := make(chan error, 1)
	go func() {
		write := func(frames []byte) error {
			conn.SetWriteDeadline(time.Now().Add(8 * time.Second))
			_, err := conn.Write(frames)
			return err
		}
		var err error
		var frames []byte
		for i := 0; i < n && err == nil; {
			frames = frames[:0]
			for ; i < n && len(frames) < 64<<10; i++ {
				frames = append(frames, clientFrame(true, opText, []byte(msg(i)))...)
			}
			if err = write(frames); err == nil {
				sent = i
			}
		}
		// All sent: the last again, until the server, which stopped
		// reading it, has closed it after -write-timeout of not reading.
		for err == nil {
			err = write(clientFrame(true, opText, []byte(msg(n-1))))
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = io.Copy(io.Discard, conn) // nil at EOF
			if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("the server had not closed the flooder: %v", err)
			} else {
				err = nil
			}
		}
		done <- err
	}()

	other := dialWS(t, "http://"+c.addr, "")
	key := "/ev/" + t.Name() // a key of its own, so that its revisions start at 0
	other.roundTrip(fmt.Sprintf(`{"type":"subscribe","payload":{"key":%q},"id":0}`, key), fmt.Sprintf(`{"type":"ok","payload":{"key":%q},"id":0}`, key))
	var slowest time.Duration
	for i := 0; ; i++ {
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
				t.Error(err)
			}
			peak = max(peak, int64(c.mem())-idle)
			t.Logf("flooder sent %d messages, then was closed; server heap at most %d MiB above idle; the other client's slowest round trip %v", sent, peak>>20, slowest)
			return sent, peak
		default:
		}
		start := time.Now()
		other.roundTrip(fmt.Sprintf(`{"type":"set","payload":{"key":%q,"value":%d},"id":%d}`, key, i, i+1),
			fmt.Sprintf(`{"type":"value","payload":{"key":%q,"value":%d,"revision":%d,"seq":_}}`, key, i, i))
		if got := other.recv(); got != fmt.Sprintf(`{"type":"ok","payload":{"key":%q,"revision":%d},"id":%d}`, key, i, i+1) {
			t.Fatalf("another client's set %d during the flood: got %s", i, got)
		}
		slowest = max(slowest, time.Since(start))
		peak = max(peak, int64(c.mem())-idle)
	}
}

// TestWebSocketFloodStates: a client that asks again and again for a
// state (subscribe / with initial over 2,000 keys; since resumes; new
// subscriptions past -max-subscriptions) and never reads holds the
// server's heap within 64 MiB of idle, is closed after -write-timeout,
// and holds up no other client. The states are read as the connection
// drains, never copied, and everything queued for it counts against one
// bound. (With ATOMKV_TEST_WS_BOUND=1099511627776, no bound, it fails.)
func TestWebSocketFloodStates(t *testing.T) {
	c := startChild(t, "atomkv", "ATOMKV_WRITE_TIMEOUT=2s", "ATOMKV_HEARTBEAT=1s")
	url := "http://" + c.addr
	pad := strings.Repeat("p", 100)
	for i := range 2000 {
		do(t, "POST", fmt.Sprintf("%s/k/%04d", url, i), fmt.Sprintf(`{"n":%d,"pad":"%s"}`, i, pad))
	}
	first := dialWS(t, url, "")
	first.roundTrip(`{"type":"subscribe","payload":{"key":"/k/0000","initial":true},"id":0}`, `{"type":"ok","payload":{"key":"/k/0000"},"id":0}`)
	var old struct{ Payload struct{ Seq int64 } }
	json.Unmarshal([]byte(first.recvRaw()), &old)
	for i := range 2000 { // every key changed after old
		do(t, "POST", fmt.Sprintf("%s/k/%04d", url, i), fmt.Sprintf(`{"n":%d,"pad":"%s"}`, -i, pad))
	}
	for _, tt := range []struct {
		name string
		n    int
		msg  func(i int) string
	}{
		{"initial", 1_000_000, func(i int) string {
			return fmt.Sprintf(`{"type":"subscribe","payload":{"key":"/","initial":true},"id":%d}`, i)
		}},
		{"since", 1_000_000, func(i int) string {
			return fmt.Sprintf(`{"type":"subscribe","payload":{"key":"/k/","since":%d},"id":%d}`, old.Payload.Seq, i)
		}},
		{"subscriptions", 100_000, func(i int) string {
			return fmt.Sprintf(`{"type":"subscribe","payload":{"key":"/s/%d","initial":true},"id":%d}`, i, i)
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, peak := floodWebSocket(t, c, tt.n, tt.msg); peak > 64<<20 {
				t.Errorf("server heap reached %d MiB above idle during the flood; want at most 64", peak>>20)
			}
		})
	}
}

// TestWebSocketMaxSubscriptions: past -max-subscriptions a new spelling is
// refused with an error, the connection stays, and subscribing again
// under a spelling it holds keeps one subscription and queues no copy of
// anything but the state it asks for.
func TestWebSocketMaxSubscriptions(t *testing.T) {
	srv, url := newTestServer(t, "-max-subscriptions", "2")
	do(t, "POST", url+"/a/1", `1`)
	c := dialWS(t, url, "")
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/a/"},"id":1}`, `{"type":"ok","payload":{"key":"/a/"},"id":1}`)
	c.roundTrip(`{"type":"subscribe","payload":{"key":"a/"},"id":2}`, `{"type":"ok","payload":{"key":"a/"},"id":2}`)
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/b"},"id":3}`,
		`{"type":"error","payload":"subscribe \"/b\": this connection has 2 subscriptions, the most it may (-max-subscriptions): unsubscribe first","id":3}`)
	for i := range 100 { // the same spelling again: still two
		c.send(fmt.Sprintf(`{"type":"subscribe","payload":{"key":"/a/","initial":%v}}`, i == 99))
	}
	c.sync()
	if n := srv.store.subs.count.Load(); n != 2 {
		t.Errorf("%d subscriptions after subscribing again; want 2", n)
	}
	c.roundTrip(`{"type":"unsubscribe","payload":{"key":"a/"},"id":4}`, `{"type":"ok","payload":{"key":"a/"},"id":4}`)
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/b"},"id":5}`, `{"type":"ok","payload":{"key":"/b"},"id":5}`)
}

// fillKeys stores n keys /big/0000000 ... in the child, each {"i":<n>},
// with pipelined WebSocket sets (no id: no replies), then a get to know
// they are all in.
func fillKeys(t *testing.T, c *child, n int) {
	t.Helper()
	conn, r := dialRaw(t, "http://"+c.addr)
	conn.SetWriteDeadline(time.Now().Add(5 * time.Minute))
	var frames []byte
	for i := range n {
		frames = append(frames, clientFrame(true, opText, fmt.Appendf(nil, `{"type":"set","payload":{"key":"/big/%07d","value":{"i":%d}}}`, i, i))...)
		if len(frames) > 256<<10 || i == n-1 {
			if _, err := conn.Write(frames); err != nil {
				t.Fatal(err)
			}
			frames = frames[:0]
		}
	}
	conn.Write(clientFrame(true, opText, []byte(`{"type":"get","payload":{"key":"/done"},"id":1}`)))
	conn.SetReadDeadline(time.Now().Add(5 * time.Minute))
	if _, payload, err := readFrame(t, conn, r); err != nil || !strings.Contains(string(payload), `"id":1`) {
		t.Fatalf("after the sets: %s, %v", payload, err)
	}
	conn.Close()
}

// slowState subscribes to / with initial on a connection that reads
// slowly (64 KB at a time, with a pause between), checks that every key
// of /big/ arrives once, then synced, and returns the server heap's peak
// above what it was before the subscription.
func slowState(t *testing.T, c *child, n int) (peak int64) {
	t.Helper()
	before := int64(c.mem())
	conn, err := net.Dial("tcp", c.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.(*net.TCPConn).SetReadBuffer(64 << 10)
	cfg, _ := websocket.NewConfig("ws://"+c.addr+"/", "http://localhost/")
	if _, err := websocket.NewClient(cfg, conn); err != nil {
		t.Fatal(err)
	}
	conn.Write(clientFrame(true, opText, []byte(`{"type":"subscribe","payload":{"key":"/","initial":true}}`)))
	r := bufio.NewReaderSize(&pacedReader{conn}, 64<<10)
	seen := make([]bool, n)
	got := 0
	for {
		conn.SetReadDeadline(time.Now().Add(60 * time.Second))
		op, payload, err := readFrame(t, conn, r)
		if err != nil {
			t.Fatalf("after %d keys: %v", got, err)
		}
		if op != opText {
			continue
		}
		var m struct {
			Type    string
			Payload struct {
				Key   string
				Value struct{ I int }
			}
		}
		if err := json.Unmarshal(payload, &m); err != nil {
			t.Fatalf("%s: %v", payload, err)
		}
		if m.Type == "synced" {
			break
		}
		if !strings.HasPrefix(m.Payload.Key, "/big/") {
			continue
		}
		if i := m.Payload.Value.I; seen[i] {
			t.Fatalf("key %s twice", m.Payload.Key)
		} else {
			seen[i] = true
			got++
		}
		if got%(n/8) == 0 {
			peak = max(peak, int64(c.mem())-before)
		}
	}
	if got != n {
		t.Errorf("%d keys before synced; want %d", got, n)
	}
	t.Logf("%d keys read slowly, each once, then synced; server heap at most %d KiB above what it was before the subscription", got, peak>>10)
	return peak
}

// pacedReader is a slow client: a pause before each read.
type pacedReader struct{ conn net.Conn }

func (p *pacedReader) Read(b []byte) (int, error) {
	time.Sleep(time.Millisecond) // pacing a slow client, not waiting for anything
	return p.conn.Read(b)
}

// TestWebSocketSlowState: a subscription with initial to a prefix of
// 20,000 keys, read slowly, gets every key once, then synced, and the
// server's heap stays flat meanwhile (within 8 MiB): the state is read
// from the store as the connection drains, never copied. The 1,000,000-key
// run is TestLoadSlowState.
func TestWebSocketSlowState(t *testing.T) {
	c := startChild(t, "atomkv")
	fillKeys(t, c, 20_000)
	if peak := slowState(t, c, 20_000); peak > 8<<20 {
		t.Errorf("server heap grew by %d MiB during the state; want at most 8", peak>>20)
	}
}

// TestLoadSlowState: the same over 1,000,000 keys; and what a queued
// subscription with initial costs until it is read: one connection
// subscribes to / (its state in progress, the client reading nothing),
// then 10,000 prefixes with initial, which wait behind it.
func TestLoadSlowState(t *testing.T) {
	needLoad(t)
	const n = 1_000_000
	c := startChild(t, "atomkv")
	fillKeys(t, c, n)
	if peak := slowState(t, c, n); peak > 16<<20 {
		t.Errorf("server heap grew by %d MiB during the state; want at most 16", peak>>20)
	}

	conn, r := dialRaw(t, "http://"+c.addr)
	conn.(*net.TCPConn).SetReadBuffer(4096)
	conn.Write(clientFrame(true, opText, []byte(`{"type":"subscribe","payload":{"key":"/","initial":true},"id":0}`)))
	readFrame(t, conn, r) // the ok: the state is under way, and stays so
	before := int64(c.mem())
	const subs = 10_000
	var frames []byte
	for i := range subs {
		frames = append(frames, clientFrame(true, opText, fmt.Appendf(nil, `{"type":"subscribe","payload":{"key":"/big/%d/","initial":true}}`, i))...)
	}
	conn.Write(frames)
	var after int64
	for range 50 { // until the reader has handled them all: the heap stops growing
		time.Sleep(100 * time.Millisecond)
		if m := int64(c.mem()); m == after {
			break
		} else {
			after = m
		}
	}
	fmt.Printf("lazy state: %.0f B of server memory per queued subscription with initial over %d keys\n", float64(after-before)/subs, n)
}

// TestWebSocketSubscribedAtOK: once a subscribe's ok is queued, and so
// may be on the wire, the subscription is registered: a client that
// writes the key the moment it reads the ok is told of its write. The ok
// used to be queued just before the registration, and a write in between
// was lost to the subscriber for good (the flake of
// TestKvServerKeys/two_spellings, which writes as soon as it has the ok).
// Here the test is the stream's writer, so the write comes at the worst
// moment every time.
func TestWebSocketSubscribedAtOK(t *testing.T) {
	srv, _ := newTestServer(t)
	conn, peer := net.Pipe()
	t.Cleanup(func() { peer.Close() })
	c := &wsConn{s: srv, subs: make(map[string]*subscription), done: make(chan struct{})}
	c.st = srv.writers.newStream(conn) // never started: no writer but this test
	c.st.proto = c
	t.Cleanup(func() { c.st.Close() })

	var (
		mu    sync.Mutex
		sent  []string // what the writer took, as it would send it
		wrote = make(chan struct{})
		once  sync.Once
	)
	write := func() {
		if _, err := srv.store.Set("/k", "7", 0); err != nil {
			t.Error(err)
		}
		close(wrote)
	}
	c.st.q.notify = func() { // after every push: the writer takes it at once
		batch, _ := c.st.q.drain()
		mu.Lock()
		for i := range batch {
			switch ev := &batch[i]; ev.kind {
			case evGone:
			case evReply:
				sent = append(sent, string(ev.reply.append(nil)))
			default:
				sent = append(sent, seqField.ReplaceAllString(string(appendWSEvent(nil, ev, new(int64))), `"seq":_`))
			}
		}
		mu.Unlock()
		ok := len(batch) > 0 && batch[0].kind == evReply
		c.st.q.recycle(batch)
		if ok {
			// The client has the ok and writes the key. Its write
			// runs now, unless the store is busy (a subscribe in
			// progress holds seqMu), and then as soon as it is free,
			// as a client's would.
			once.Do(func() {
				if srv.store.seqMu.TryLock() {
					srv.store.seqMu.Unlock()
					write()
				} else {
					go write()
				}
			})
		}
	}
	c.handle([]byte(`{"type":"subscribe","payload":{"key":"k"},"id":1}`))
	<-wrote
	mu.Lock()
	defer mu.Unlock()
	want := []string{
		`{"type":"ok","payload":{"key":"k"},"id":1}`,
		`{"type":"value","payload":{"key":"k","value":7,"revision":0,"seq":_}}`,
	}
	if !slices.Equal(sent, want) {
		t.Errorf("a write made as soon as the ok was out: the connection got\n%s\nwant\n%s", strings.Join(sent, "\n"), strings.Join(want, "\n"))
	}
}
