package main

import (
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/net/websocket"
)

// TestOutcomes sends the same bad inputs through the native HTTP API,
// KvServer's REST shape and the WebSocket: each ends in the same outcome
// everywhere, answered with the status (or reply) outcomeTable gives that
// interface, with the same message, and counted under the same label of
// atomkv_writes_total.
func TestOutcomes(t *testing.T) {
	tokens := writeTokens(t, "rw write /", "ro read /")
	srv, url := newTestServer(t, "-tokens", tokens, "-max-keys", "3", "-max-value-bytes", "100", "-kvserver-rest", "/storage")
	for _, k := range []string{"/c", "/full/1", "/full/2"} { // the store is full
		srv.store.Set(k, "1", 0)
	}
	rw, ro := []string{"Authorization", "Bearer rw"}, []string{"Authorization", "Bearer ro"}
	ws, _ := dialToken(t, url, "rw")
	wsRO, _ := dialToken(t, url, "ro")
	big := `"` + strings.Repeat("x", 200) + `"`
	type httpReq struct {
		method, path, body string
		headers            []string
	}
	for _, tt := range []struct {
		name    string
		want    outcome
		msg     string // every interface's message holds it
		native  httpReq
		rest    *httpReq // nil: KvServer's REST shape cannot end so
		ws      string   // "": the WebSocket cannot end so
		wsAs    *wsClient
		counted bool // the WebSocket message is known to be a write
	}{
		{"too large", outcomeTooLarge, "larger than",
			httpReq{"POST", "/x", big, rw}, &httpReq{"POST", "/storage/x", `{"value":` + big + `}`, rw},
			`{"type":"set","payload":{"key":"/x","value":` + big + `},"id":1}`, ws, true},
		{"too large, chunked", outcomeTooLarge, "larger than",
			httpReq{"POST", "/x", "chunked:" + big, rw}, &httpReq{"POST", "/storage/x", "chunked:" + strings.Repeat(" ", 80_000), rw}, // past the read limit
			"", nil, false},
		{"bad key", outcomeBadRequest, `invalid key "/a\x01b"`,
			httpReq{"POST", "/a%01b", "1", rw}, &httpReq{"POST", "/storage/a%01b", `{"value":1}`, rw},
			`{"type":"set","payload":{"key":"/a\u0001b","value":1},"id":1}`, ws, true},
		{"bad JSON", outcomeBadRequest, "invalid",
			httpReq{"POST", "/x", "{", rw}, &httpReq{"POST", "/storage/x", `{"value": }`, rw},
			`{"type":"set","payload":{"key":"/x","value": }}`, ws, false},
		{"bad TTL", outcomeBadRequest, `invalid TTL "soon"`,
			httpReq{"POST", "/x?ttl=soon", "1", rw}, &httpReq{"POST", "/storage/x", `{"value":1,"ttl":"soon"}`, rw},
			`{"type":"set","payload":{"key":"/x","value":1,"ttl":"soon"},"id":1}`, ws, true},
		{"conflict", outcomeConflict, "",
			httpReq{"PUT", "/c", "2", append([]string{"X-Revision", "5"}, rw...)}, nil,
			`{"type":"update","payload":{"key":"/c","value":2,"revision":5},"id":1}`, ws, true},
		{"conflict on delete", outcomeConflict, "",
			httpReq{"DELETE", "/c", "", append([]string{"X-Revision", "5"}, rw...)}, nil,
			`{"type":"delete","payload":{"key":"/c","revision":5},"id":1}`, ws, true},
		{"full", outcomeFull, "store is full: at most 3 keys",
			httpReq{"POST", "/new", "1", rw}, &httpReq{"POST", "/storage/new", `{"value":1}`, rw},
			`{"type":"set","payload":{"key":"/new","value":1},"id":1}`, ws, true},
		{"forbidden", outcomeForbidden, `this token may not write "/x"`,
			httpReq{"POST", "/x", "1", ro}, &httpReq{"POST", "/storage/x", `{"value":1}`, ro},
			`{"type":"set","payload":{"key":"/x","value":1},"id":1}`, wsRO, true},
		{"forbidden delete", outcomeForbidden, `this token may not write "/c"`,
			httpReq{"DELETE", "/c", "", ro}, &httpReq{"DELETE", "/storage/c", "", ro},
			`{"type":"delete","payload":{"key":"/c"},"id":1}`, wsRO, true},
		{"no token", outcomeNoToken, "missing token",
			httpReq{"POST", "/x", "1", nil}, &httpReq{"POST", "/storage/x", `{"value":1}`, nil},
			"", nil, false}, // a WebSocket without a token does not open
	} {
		t.Run(tt.name, func(t *testing.T) {
			row := outcomeTable[tt.want]
			check := func(via string, code, want int, msg string, counted bool, before [results]int64) {
				t.Helper()
				if code != want {
					t.Errorf("%s: %d %q; want %d (%s)", via, code, msg, want, tt.want)
				}
				if !strings.Contains(msg, tt.msg) {
					t.Errorf("%s: message %q; want one with %q", via, msg, tt.msg)
				}
				for i := range results {
					moved := srv.metrics.writes[i].Load() - before[i]
					if wantMoved := int64(0); counted && i == row.result {
						wantMoved = 1
						if moved != wantMoved {
							t.Errorf("%s: writes{result=%q} moved by %d; want 1", via, resultNames[i], moved)
						}
					} else if moved != wantMoved {
						t.Errorf("%s: writes{result=%q} moved by %d; want 0", via, resultNames[i], moved)
					}
				}
			}
			send := func(r httpReq) response {
				if body, ok := strings.CutPrefix(r.body, "chunked:"); ok {
					return doChunked(t, r.method, url+r.path, body, r.headers...)
				}
				return do(t, r.method, url+r.path, r.body, r.headers...)
			}
			before := writeCounts(srv)
			got := send(tt.native)
			check("HTTP "+tt.native.method+" "+tt.native.path, got.code, row.http, errorMessage(got), true, before)
			if tt.rest != nil {
				before = writeCounts(srv)
				got = send(*tt.rest)
				check("REST "+tt.rest.method+" "+tt.rest.path, got.code, row.rest, errorMessage(got), true, before)
			}
			if tt.ws != "" {
				before = writeCounts(srv)
				tt.wsAs.send(tt.ws)
				var reply struct {
					Type    string
					Payload json.RawMessage
				}
				raw := tt.wsAs.recv()
				json.Unmarshal([]byte(raw), &reply)
				code := row.http // what check wants: the reply is of the row's type
				if reply.Type != row.ws {
					code = 0
				}
				var msg string
				json.Unmarshal(reply.Payload, &msg)
				check("WebSocket "+tt.ws+" → "+raw, code, row.http, msg, tt.counted, before)
			}
		})
	}
	if e := srv.store.Get("/c"); e == nil || e.value != "1" {
		t.Errorf("/c after the bad inputs: %v; want it untouched", e)
	}

	// What no request here can provoke (a failed disk), and every row:
	// the status each shape answers, and the label.
	for o := range outcomes {
		if o == outcomeOK || o == outcomeConflict {
			continue // answered with a value, not an error
		}
		err := errorOf(o)
		if got := outcomeOf(err); got != o {
			t.Errorf("outcomeOf(%v) = %s; want %s", err, got, o)
		}
		for _, a := range []api{apiNative, apiREST} {
			rec := httptest.NewRecorder()
			srv.serveFailure(rec, a, err)
			if rec.Code != a.status(o) || !strings.HasPrefix(rec.Body.String(), `{"error":`) {
				t.Errorf("%s in shape %v: %d %s; want %d and a JSON error", o, a, rec.Code, rec.Body, a.status(o))
			}
		}
		if writeResult(err) != outcomeTable[o].result {
			t.Errorf("%s: counted as %s; want %s", o, resultNames[writeResult(err)], resultNames[outcomeTable[o].result])
		}
	}
}

// errorOf returns an error of outcome o, as the server makes one.
func errorOf(o outcome) error {
	switch o {
	case outcomeConflict:
		return &conflictError{}
	case outcomeTooLarge:
		return &tooLargeError{"value", 1}
	case outcomeFull:
		return errFull
	case outcomeNoToken:
		return errUnknownToken
	case outcomeForbidden:
		return &accessError{403, "this token may not"}
	case outcomeUnavailable:
		return errNotWritten
	}
	return checkKey("", 10)
}

func writeCounts(srv *server) (counts [results]int64) {
	for i := range counts {
		counts[i] = srv.metrics.writes[i].Load()
	}
	return counts
}

// TestValueSizeRule: the value limit weighs the compacted value, on every
// interface. A value that fits only once compacted is taken by HTTP POST
// and PUT, KvServer's REST POST and the WebSocket's set and update, and
// stored compacted; one whose compacted form is a byte over is refused by
// each (413, KvServer's 400, error), however it is spaced; and a body
// past the read limit is refused as it is read (the WebSocket closes).
func TestValueSizeRule(t *testing.T) {
	const max = 1000
	srv, url := newTestServer(t, "-max-value-bytes", strconv.Itoa(max), "-kvserver-rest", "/storage")
	// compact returns a value of n bytes compacted; padded, the same
	// spread over three times as many.
	compact := func(n int) string { return `{"a":"` + strings.Repeat("x", n-8) + `"}` }
	padded := func(n int) string {
		v := strings.Replace(compact(n), `":"`, "\" :\n\t  \"", 1)
		return "\n" + strings.Repeat(" ", 2*n) + v + "  \n"
	}
	ws := dialWS(t, url, "")
	for _, tt := range []struct {
		name  string
		raw   string // as sent
		value string // as stored; "" if refused
		msg   string // if refused, the message every interface gives
	}{
		{"compact, at the limit", compact(max), compact(max), ""},
		{"padded, at the limit", padded(max), compact(max), ""},
		{"compact, a byte over", compact(max + 1), "", "value larger than 1000 bytes"},
		{"padded, a byte over", padded(max + 1), "", "value larger than 1000 bytes"},
		{"past the read limit", "1" + strings.Repeat(" ", int(srv.readLimit())), "", fmt.Sprintf("body larger than %d bytes", srv.readLimit())},
	} {
		t.Run(tt.name, func(t *testing.T) {
			key := "/size/" + strings.ReplaceAll(tt.name, " ", "_")
			stored := func(via string) {
				t.Helper()
				e := srv.store.Get(key)
				switch {
				case tt.value == "" && e != nil:
					t.Errorf("%s: stored %.40q…; want nothing", via, e.value)
				case tt.value != "" && (e == nil || e.value != tt.value):
					t.Errorf("%s: stored %v; want the value compacted", via, e)
				}
				srv.store.Delete(key, -1)
			}
			for _, r := range []struct {
				via     string
				method  string
				path    string
				body    string
				headers []string
				ok, bad int
			}{
				{"HTTP POST", "POST", key, tt.raw, nil, 200, 413},
				{"HTTP PUT", "PUT", key, tt.raw, []string{"X-Revision", "0"}, 200, 413},
				{"HTTP POST, chunked", "chunked", key, tt.raw, nil, 200, 413},
				{"KvServer REST POST", "POST", "/storage" + key, `{"value":` + tt.raw + `}`, nil, 202, 400},
			} {
				var got response
				if r.method == "chunked" {
					got = doChunked(t, "POST", url+r.path, r.body, r.headers...)
				} else {
					got = do(t, r.method, url+r.path, r.body, r.headers...)
				}
				switch {
				case tt.value != "" && got.code != r.ok:
					t.Errorf("%s: %d %.80s; want %d", r.via, got.code, got.body, r.ok)
				case tt.value == "" && (got.code != r.bad || errorMessage(got) != tt.msg):
					t.Errorf("%s: %d %.80s; want %d %q", r.via, got.code, got.body, r.bad, tt.msg)
				}
				stored(r.via)
			}
			for _, typ := range []string{"set", "update"} {
				msg := `{"type":"` + typ + `","payload":{"key":"` + key + `","revision":0,"value":` + tt.raw + `},"id":1}`
				if strings.HasPrefix(tt.msg, "body") {
					// Past the read limit a message is not read: the
					// connection closes (1009, as TestWebSocketFrames
					// shows), maybe while the message is still being sent.
					websocket.Message.Send(ws.ws, msg)
					if err := websocket.Message.Receive(ws.ws, &msg); err == nil {
						t.Errorf("WebSocket %s: %.80s; want the connection closed", typ, msg)
					}
					ws = dialWS(t, url, "")
					stored("WebSocket " + typ)
					continue
				}
				ws.send(msg)
				want := `{"type":"ok","payload":{"key":"` + key + `","revision":0},"id":1}`
				if tt.value == "" {
					want = `{"type":"error","payload":"` + tt.msg + `","id":1}`
				}
				if got := ws.recv(); got != want {
					t.Errorf("WebSocket %s: %.80s; want %s", typ, got, want)
				}
				stored("WebSocket " + typ)
			}
		})
	}
}
