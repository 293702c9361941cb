package main

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
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
			httpReq{"POST", "/x", "chunked:" + big, rw}, &httpReq{"POST", "/storage/x", "chunked:" + strings.Repeat(" ", 5000), rw},
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
