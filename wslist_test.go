package main

// Tests of the WebSocket list (SPEC 3a, 5): limit, after and shallow
// under both spellings of keys, and a long list as one message in
// fragments.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// rawWS is a WebSocket spoken frame by frame, so that a test sees how a
// message is cut: x/net/websocket's Message codec returns each frame of
// a message in fragments as a message of its own.
type rawWS struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func dialRawWS(t testing.TB, url string) *rawWS {
	t.Helper()
	conn, r := dialRaw(t, url)
	return &rawWS{t, conn, r}
}

func (c *rawWS) send(msg string) {
	c.t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.conn.Write(clientFrame(true, opText, []byte(msg))); err != nil {
		c.t.Fatalf("send %s: %v", msg, err)
	}
}

// read returns the next message, its fragments joined, and how many
// frames it came in. A ping is answered; a frame that breaks the order of
// fragments (a new message before the last one's final frame, a
// continuation of nothing) fails the test.
func (c *rawWS) read() (msg []byte, frames int) {
	c.t.Helper()
	for {
		c.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		var h [2]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			c.t.Fatalf("after %d frames of a message: %v", frames, err)
		}
		if h[0]&0x70 != 0 || h[1]&0x80 != 0 {
			c.t.Fatalf("server frame header % x: want no reserved bit, no mask", h)
		}
		fin, op := h[0]&0x80 != 0, h[0]&0x0f
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var ext [2]byte
			io.ReadFull(c.r, ext[:])
			n = uint64(ext[0])<<8 | uint64(ext[1])
		case 127:
			var ext [8]byte
			io.ReadFull(c.r, ext[:])
			n = 0
			for _, b := range ext {
				n = n<<8 | uint64(b)
			}
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.r, payload); err != nil {
			c.t.Fatal(err)
		}
		switch {
		case op == opPing:
			c.conn.Write(clientFrame(true, opPong, payload))
			continue
		case op == opPong:
			continue
		case op == opClose:
			c.t.Fatalf("close frame % x after %d frames of a message", payload, frames)
		case op == opText && frames > 0:
			c.t.Fatalf("a text frame inside a message in fragments, after %d of them: %.100s", frames, payload)
		case op == opContinuation && frames == 0:
			c.t.Fatalf("a continuation frame with no message to continue: %.100s", payload)
		case op != opText && op != opContinuation:
			c.t.Fatalf("frame opcode %#x", op)
		}
		msg = append(msg, payload...)
		frames++
		if fin {
			return msg, frames
		}
	}
}

// TestWebSocketList: list with limit, after and shallow, under both
// spellings of keys; without any of them the reply is the bare array
// KvServer clients expect, with any it is {items, seq, next?}, next
// being the after of the next page, spelled as the prefix.
func TestWebSocketList(t *testing.T) {
	srv, base := newTestServer(t)
	for _, k := range []string{"/room/a", "/room/b", "/room/c/1", "/room/c/2", "/room/d", "/room0", "/other"} {
		srv.store.Set(k, `1`, 0)
	}
	c := dialWS(t, base, "")
	item := func(key string) string { return fmt.Sprintf(`{"key":%q,"value":1,"revision":0}`, key) }
	for _, tt := range []struct{ payload, want string }{
		{`{"prefix":"/room/"}`, `[` + strings.Join([]string{item("/room/a"), item("/room/b"), item("/room/c/1"), item("/room/c/2"), item("/room/d")}, ",") + `]`},
		{`{"prefix":"room/"}`, `[` + strings.Join([]string{item("room/a"), item("room/b"), item("room/c/1"), item("room/c/2"), item("room/d")}, ",") + `]`},
		{`{"prefix":"room"}`, `[` + strings.Join([]string{item("room/a"), item("room/b"), item("room/c/1"), item("room/c/2"), item("room/d")}, ",") + `]`},
		{`{"prefix":"/room/c/","limit":10}`, `{"items":[` + item("/room/c/1") + `,` + item("/room/c/2") + `],"seq":_}`},
		{`{"prefix":"/room/","limit":2}`, `{"items":[` + item("/room/a") + `,` + item("/room/b") + `],"seq":_,"next":"/room/b"}`},
		{`{"prefix":"room/","limit":2}`, `{"items":[` + item("room/a") + `,` + item("room/b") + `],"seq":_,"next":"room/b"}`},
		{`{"prefix":"room/","limit":2,"after":"room/b"}`, `{"items":[` + item("room/c/1") + `,` + item("room/c/2") + `],"seq":_,"next":"room/c/2"}`},
		{`{"prefix":"room/","limit":2,"after":"room/c/2"}`, `{"items":[` + item("room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","limit":1,"after":"/room/c/2"}`, `{"items":[` + item("/room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","after":"/room/bb"}`, `{"items":[` + item("/room/c/1") + `,` + item("/room/c/2") + `,` + item("/room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","after":""}`, `{"items":[` + strings.Join([]string{item("/room/a"), item("/room/b"), item("/room/c/1"), item("/room/c/2"), item("/room/d")}, ",") + `],"seq":_}`},
		{`{"prefix":"/room/","shallow":true}`, `{"items":[` + item("/room/a") + `,` + item("/room/b") + `,{"prefix":"/room/c/"},` + item("/room/d") + `],"seq":_}`},
		{`{"prefix":"room/","shallow":true}`, `{"items":[` + item("room/a") + `,` + item("room/b") + `,{"prefix":"room/c/"},` + item("room/d") + `],"seq":_}`},
		{`{"prefix":"room/","shallow":true,"limit":3}`, `{"items":[` + item("room/a") + `,` + item("room/b") + `,{"prefix":"room/c/"}],"seq":_,"next":"room/c/"}`},
		{`{"prefix":"room/","shallow":true,"limit":3,"after":"room/c/"}`, `{"items":[` + item("room/d") + `],"seq":_}`},
		{`{"prefix":"/room/","shallow":true,"limit":1,"after":"/room/b"}`, `{"items":[{"prefix":"/room/c/"}],"seq":_,"next":"/room/c/"}`},
		{`{"prefix":"/none/","limit":5}`, `{"items":[],"seq":_}`},
		{`{"prefix":"/none/"}`, `[]`},
		{`{"prefix":"/room/","limit":0}`, `"list: invalid limit \"0\": want an integer from 1 to 10000"`},
		{`{"prefix":"/room/","limit":10001}`, `"list: invalid limit \"10001\": want an integer from 1 to 10000"`},
		{`{"prefix":"/room/","after":"/room/c/"}`, `"list: invalid after: invalid key \"/room/c/\": ends with \"/\" (a prefix, not a key)"`},
		{`{"prefix":"/room/","after":"room/a"}`, `"list: invalid after: invalid key \"room/a\": must begin with \"/\""`},
	} {
		msg := fmt.Sprintf(`{"type":"list","payload":%s,"id":7}`, tt.payload)
		want := fmt.Sprintf(`{"type":"values","payload":%s,"id":7}`, tt.want)
		if strings.HasPrefix(tt.want, `"`) {
			want = fmt.Sprintf(`{"type":"error","payload":%s,"id":7}`, tt.want)
		}
		c.roundTrip(msg, want)
	}

	t.Run("pages", func(t *testing.T) {
		for _, prefix := range []string{"/room/", "room/", "/"} {
			for limit := 1; limit <= 3; limit++ {
				var got []string
				after := ""
				for pages := 0; ; pages++ {
					c.send(fmt.Sprintf(`{"type":"list","payload":{"prefix":%q,"limit":%d,"after":%q}}`, prefix, limit, after))
					var reply struct {
						Payload struct {
							Items []listItem
							Seq   int64
							Next  *string
						}
					}
					if err := json.Unmarshal([]byte(c.recvRaw()), &reply); err != nil || reply.Payload.Seq == 0 {
						t.Fatalf("prefix %q: %v, seq %d", prefix, err, reply.Payload.Seq)
					}
					for _, it := range reply.Payload.Items {
						got = append(got, it.name())
					}
					if reply.Payload.Next == nil {
						break
					}
					after = *reply.Payload.Next
				}
				want := []string{"/other", "/room/a", "/room/b", "/room/c/1", "/room/c/2", "/room/d", "/room0"}
				if strings.HasPrefix(prefix, "/room") || strings.HasPrefix(prefix, "room") {
					want = want[1:6]
				}
				if !strings.HasPrefix(prefix, "/") {
					for i := range want {
						want[i] = want[i][1:]
					}
				}
				if !slices.Equal(got, want) {
					t.Errorf("prefix %q limit %d, page after page: got %q; want %q", prefix, limit, got, want)
				}
			}
		}
	})
}

// TestWebSocketListRootSpelling: a list prefix "" is KvServer's spelling
// of "/" (SPEC 5: a list prefix that does not begin with "/" is a
// KvServer key; docs/websocket.md says so of ""), so its keys come
// without the leading slash, as for "room/" and for a subscription to "".
func TestWebSocketListRootSpelling(t *testing.T) {
	srv, base := newTestServer(t)
	srv.store.Set("/a", `1`, 0)
	c := dialWS(t, base, "")
	c.roundTrip(`{"type":"list","payload":{"prefix":""},"id":1}`, `{"type":"values","payload":[{"key":"a","value":1,"revision":0}],"id":1}`)
	c.roundTrip(`{"type":"list","payload":{"prefix":"","limit":1},"id":2}`, `{"type":"values","payload":{"items":[{"key":"a","value":1,"revision":0}],"seq":_},"id":2}`)
	c.roundTrip(`{"type":"subscribe","payload":{"key":"","initial":true},"id":3}`, `{"type":"ok","payload":{"key":""},"id":3}`)
	if got, want := c.recv(), `{"type":"value","payload":{"key":"a","value":1,"revision":0,"seq":_}}`; got != want {
		t.Errorf("subscribe \"\" with initial: got %s; want %s", got, want)
	}
}

// TestWebSocketListBadTypes: a list whose limit, after or shallow has the
// wrong JSON type gets an error that says what it must be.
func TestWebSocketListBadTypes(t *testing.T) {
	_, base := newTestServer(t)
	c := dialWS(t, base, "")
	for _, tt := range []struct{ payload, want string }{
		{`{"prefix":"/","limit":"5"}`, `list: \"limit\" must be an integer`},
		{`{"prefix":"/","limit":1.5}`, `list: \"limit\" must be an integer`},
		{`{"prefix":"/","shallow":"yes"}`, `list: \"shallow\" must be true or false`},
		{`{"prefix":"/","after":5}`, `list: \"after\" must be a string`},
	} {
		c.roundTrip(fmt.Sprintf(`{"type":"list","payload":%s,"id":1}`, tt.payload), fmt.Sprintf(`{"type":"error","payload":"%s","id":1}`, tt.want))
	}
}

// TestWebSocketListLarge: a list of more than 1,000 keys (of a prefix,
// and of everything, paged or not, under both spellings) is one message,
// sent in several fragments, every key in key order; on a connection
// that watches the prefix while another client writes it, no event comes
// between the fragments, and a request sent right after the list is
// answered after the whole of it.
func TestWebSocketListLarge(t *testing.T) {
	srv, base := newTestServer(t)
	const n = 1500
	rng := rand.New(rand.NewPCG(3, 4))
	var want []string
	for _, i := range rng.Perm(n) { // written out of order
		k := fmt.Sprintf("/big/%04d-%s", i, strings.Repeat("x", i%50))
		srv.store.Set(k, fmt.Sprintf(`{"i":%d}`, i), 0)
		want = append(want, k)
	}
	srv.store.Set("/big0", `0`, 0)
	slices.Sort(want)

	c := dialRawWS(t, base)
	c.send(`{"type":"subscribe","payload":{"key":"/big/"},"id":"sub"}`)
	if msg, _ := c.read(); string(msg) != `{"type":"ok","payload":{"key":"/big/"},"id":"sub"}` {
		t.Fatalf("subscribe: %s", msg)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // writes the prefix all along: events for c
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			srv.store.Set(fmt.Sprintf("/big/%04d-w", i%n), `"w"`, 0)
			srv.store.Delete(fmt.Sprintf("/big/%04d-w", (i+n/2)%n), -1)
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	for _, tt := range []struct {
		payload string
		paged   bool
		spell   func(string) string
	}{
		{`{"prefix":"/big/"}`, false, func(k string) string { return k }},
		{`{"prefix":"big/"}`, false, func(k string) string { return k[1:] }},
		{`{"prefix":"/big/","limit":10000}`, true, func(k string) string { return k }},
		{`{"prefix":"big/","limit":1499,"after":""}`, true, func(k string) string { return k[1:] }},
		{`{"prefix":"/"}`, false, func(k string) string { return k }},
	} {
		c.send(fmt.Sprintf(`{"type":"list","payload":%s,"id":"list"}`, tt.payload))
		c.send(`{"type":"get","payload":{"key":"/after"},"id":"get"}`)
		var msg []byte
		var frames int
		for { // events of the subscription may come first
			msg, frames = c.read()
			if strings.Contains(string(msg), `"id":"list"`) {
				break
			}
			if !strings.HasPrefix(string(msg), `{"type":"value"`) && !strings.HasPrefix(string(msg), `{"type":"no-value"`) {
				t.Fatalf("list %s: before its reply: %.200s", tt.payload, msg)
			}
		}
		var reply struct {
			Type    string
			Payload json.RawMessage
		}
		if err := json.Unmarshal(msg, &reply); err != nil || reply.Type != "values" {
			t.Fatalf("list %s: %v: %.200s…", tt.payload, err, msg)
		}
		var items []listItem
		var page struct {
			Items []listItem
			Seq   int64
			Next  *string
		}
		if tt.paged {
			if err := json.Unmarshal(reply.Payload, &page); err != nil || page.Seq == 0 {
				t.Fatalf("list %s: %v, seq %d", tt.payload, err, page.Seq)
			}
			items = page.Items
		} else if err := json.Unmarshal(reply.Payload, &items); err != nil {
			t.Fatalf("list %s: %v", tt.payload, err)
		}
		var got []string
		for _, it := range items {
			if !strings.HasSuffix(it.Key, "-w") {
				got = append(got, it.Key)
			}
		}
		for i := 1; i < len(items); i++ {
			if items[i-1].Key >= items[i].Key {
				t.Fatalf("list %s: %q after %q: want key order", tt.payload, items[i].Key, items[i-1].Key)
			}
		}
		wantHere := make([]string, 0, len(want)+2)
		if tt.payload == `{"prefix":"/"}` {
			wantHere = append(wantHere, want...)
			wantHere = append(wantHere, "/big0")
			got = slices.DeleteFunc(got, func(k string) bool { return !strings.HasPrefix(k, "/big") })
		} else {
			for _, k := range want {
				wantHere = append(wantHere, tt.spell(k))
			}
		}
		if strings.Contains(tt.payload, "1499") {
			// At most 1499 items, written keys among them: compare what
			// is there and ask for the rest with next.
			if page.Next == nil {
				t.Errorf("list %s: no next, with more keys to come", tt.payload)
			}
			wantHere = wantHere[:len(got)]
		}
		if !slices.Equal(got, wantHere) {
			t.Errorf("list %s: %d keys, want %d, in key order", tt.payload, len(got), len(wantHere))
		}
		if frames < 2 {
			t.Errorf("list %s: one frame of %d bytes; want a message in fragments", tt.payload, len(msg))
		}
		for { // the get, after the list; events of the subscription may come between
			m, _ := c.read()
			if strings.Contains(string(m), `"id":"get"`) {
				break
			}
		}
		t.Logf("list %s: %d items, %d bytes, in %d frames", tt.payload, len(items), len(msg), frames)
	}
}
