// Routing: the table of routes, each declaring once what it answers and
// what it needs, and the one way from a request to its route and target
// that the access check, the handlers and the metrics share (SPEC 7, "One
// key per request"); and cors, which puts every request's path in its one
// form and applies the -origins policy before any route runs.

package main

import (
	"fmt"
	"net/http"
	"path"
	"slices"
	"strings"
)

// A route is one thing the HTTP API does, declared once: the requests it
// answers (a ServeMux pattern and, among the routes of one pattern, the
// first whose when holds), the permission it needs on its target, how the
// target is read from the path, and its handler.
type route struct {
	name    string                   // what it does, for tests and logs
	pattern string                   // as ServeMux reads it
	when    func(*http.Request) bool // nil: every request of the pattern
	perm    perm                     // needed on the target; permNone: anyone may
	api     api                      // which shape answers it, so which status codes
	strip   string                   // the prefix cut from the path to give the target
	refuse  bool                     // it answers 405: its method is not one its paths have
	serve   func(w http.ResponseWriter, r *http.Request, target string) outcome
}

// routes returns the handler of every route; this is the one place they
// are listed.
func (s *server) routes() http.Handler {
	eventStream := func(r *http.Request) bool { return accepts(r, "text/event-stream") }
	listing := func(r *http.Request) bool { return accepts(r, "application/json") }
	// The key is the whole path, so the patterns are subtrees ("GET /")
	// and the target is the path itself: a "{key...}" wildcard would cost
	// the router four allocations per request for a value we already have.
	keyRoutes := []route{
		{name: "events", pattern: "GET /", when: eventStream, perm: permRead, serve: s.serveEvents},
		{name: "get", pattern: "GET /", perm: permRead, serve: s.handleGet},
		{name: "set", pattern: "POST /", perm: permWrite, serve: s.handleSet},
		{name: "update", pattern: "PUT /", perm: permWrite, serve: s.handleUpdate},
		{name: "delete", pattern: "DELETE /", perm: permWrite, serve: s.handleDelete},
	}
	table := []route{
		{name: "websocket", pattern: "GET /{$}", when: isWebSocket, serve: s.serveUpgrade}, // checked by access.connect, then message by message
		{name: "events of every key", pattern: "GET /{$}", when: eventStream, perm: permRead, serve: s.serveEvents},
		{name: "list every key", pattern: "GET /{$}", when: listing, perm: permRead, serve: s.serveListing},
		{name: "client", pattern: "GET /{$}", serve: s.handleClient},
		// POST / names no key: it is a transaction, whose keys are in
		// its body, each checked (allowTxn) before it is evaluated.
		{name: "transaction", pattern: "POST /{$}", serve: s.handleTxn},
	}
	table = append(table, keyRoutes...)
	table = append(table,
		route{name: "preflight", pattern: "OPTIONS /", serve: s.handlePreflight},
		// Every other method: ServeMux would answer 405 itself, but with a
		// plain-text body, and every error here is JSON.
		route{name: "method not allowed", pattern: "/", refuse: true, serve: s.handleMethodNotAllowed},
	)
	if p := s.cfg.kvserverREST; p != "" {
		for _, rt := range []route{
			{name: "REST get", pattern: "GET " + p + "/", perm: permRead, serve: s.handleRESTGet},
			{name: "REST set", pattern: "POST " + p + "/", perm: permWrite, serve: s.handleRESTSet},
			{name: "REST delete", pattern: "DELETE " + p + "/", perm: permWrite, serve: s.handleRESTDelete},
			{name: "REST preflight", pattern: "OPTIONS " + p + "/", serve: s.handlePreflight},
			// PUT would otherwise fall to the native "PUT /" and write the
			// key /storage/…, which the REST shape owns.
			{name: "REST method not allowed", pattern: "PUT " + p + "/", refuse: true, serve: s.handleMethodNotAllowed},
		} {
			rt.api, rt.strip = apiREST, p
			table = append(table, rt)
			// The prefix alone is KvServer's empty key, refused as such:
			// without its own pattern ServeMux would redirect /storage to
			// /storage/.
			rt.pattern = strings.TrimSuffix(rt.pattern, "/")
			table = append(table, rt)
		}
	}

	mux := http.NewServeMux()
	s.routing = make(map[string][]*route)
	for i := range table {
		rt := &table[i]
		if s.routing[rt.pattern] == nil {
			mux.HandleFunc(rt.pattern, s.dispatch)
		}
		s.routing[rt.pattern] = append(s.routing[rt.pattern], rt)
	}
	s.mux = mux
	s.methods = methodsOf(table)

	h := s.cors(s.observe(mux))
	if s.cfg.logRequests {
		h = logRequests(s.log, h)
	}
	return h
}

// methodHeaders is what one shape of the API answers about its methods:
// Allow (with a 405, and to OPTIONS), and Access-Control-Allow-Methods (to
// a CORS preflight), which leaves out HEAD, a method CORS always allows.
type methodHeaders struct {
	allow, cors []string
}

// methodsOf returns the method headers of each shape, read from the route
// table: the method of each of its routes that does not refuse it, in the
// table's order, and HEAD after GET, as ServeMux answers HEAD with a GET
// pattern's handler.
func methodsOf(table []route) map[api]methodHeaders {
	methods := map[api][]string{}
	for _, rt := range table {
		m, _, ok := strings.Cut(rt.pattern, " ")
		if !ok || rt.refuse || slices.Contains(methods[rt.api], m) {
			continue
		}
		methods[rt.api] = append(methods[rt.api], m)
		if m == http.MethodGet {
			methods[rt.api] = append(methods[rt.api], http.MethodHead)
		}
	}
	headers := map[api]methodHeaders{}
	for a, ms := range methods {
		cors := slices.DeleteFunc(slices.Clone(ms), func(m string) bool { return m == http.MethodHead })
		headers[a] = methodHeaders{[]string{strings.Join(ms, ", ")}, []string{strings.Join(cors, ", ")}}
	}
	return headers
}

// shapeOf returns the shape that owns r's path: the one whose route a GET
// of the path reaches (KvServer's under -kvserver-rest, else the native
// one). A method no route of the path has, and a preflight, answer with
// that shape's methods.
func (s *server) shapeOf(r *http.Request) api {
	get := &http.Request{Method: http.MethodGet, URL: r.URL, Host: r.Host, Header: http.Header{}}
	_, pattern := s.mux.Handler(get)
	if rts := s.routing[pattern]; len(rts) > 0 {
		return rts[0].api
	}
	return apiNative
}

// targetOf returns the route a request matched and its target: the key,
// prefix or path it acts on. It is the one place a request's target is
// decided, from the pattern ServeMux matched (r.Pattern) and the decoded
// path, which cors made the path ServeMux matched. The access check, the
// handler and the metrics all take what it returns.
func (s *server) targetOf(r *http.Request) (*route, string) {
	routes := s.routing[r.Pattern]
	for _, rt := range routes {
		if rt.when == nil || rt.when(r) {
			return rt, r.URL.Path[len(rt.strip):]
		}
	}
	// Not reached: the last route of every pattern has no when.
	return routes[len(routes)-1], r.URL.Path
}

// dispatch answers every request ServeMux matched: it finds its route and
// target, checks the caller may act on the target, serves it, and counts
// the outcome of a write.
func (s *server) dispatch(w http.ResponseWriter, r *http.Request) {
	rt, target := s.targetOf(r)
	s.trace("route", rt, target)
	o := s.authorize(w, r, rt, target)
	if o == outcomeOK {
		o = rt.serve(w, r, target)
	}
	if rt.perm == permWrite {
		s.metrics.writes[outcomeTable[o].result].Add(1)
		s.trace("metrics", rt, target)
	}
}

// trace tells s.tracer, a test's hook (nil in a running server), the
// route and target a stage of a request acted on: "route", "access" (the
// access check) or "metrics" (the write counter).
func (s *server) trace(stage string, rt *route, target string) {
	if s.tracer != nil {
		s.tracer(stage, rt, target)
	}
}

// cors applies the origin policy to every request, before anything reads
// or changes anything: a request whose Origin is not on the -origins list
// is refused with 403 and without CORS headers (SPEC 7; CORS alone would
// not stop a page elsewhere from writing, as a POST with Content-Type:
// text/plain needs no preflight). A request without Origin is not from a
// browser page, and passes.
//
// It also puts the path in the one form routing and handlers see. A path
// not in canonical form is refused: ServeMux would redirect "/a//b" to
// "/a/b", but such a path is an invalid key, not another spelling of one.
// And the path is routed by its decoded form, the key it names (SPEC 1:
// "%2F" is a separator): ServeMux matches the escaped path, in which
// "/storage%2Froom/a" is one segment, not under "/storage/", while the
// decoded path is; so the escaped form is dropped, and ServeMux matches
// the decoded path, re-escaped where it must be.
func (s *server) cors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		if s.origins == nil {
			h["Access-Control-Allow-Origin"] = hdrAnyOrigin
		} else {
			h["Vary"] = hdrVaryOrigin
			if origin, sent := r.Header["Origin"]; sent {
				if !s.origins[origin[0]] {
					serveError(w, http.StatusForbidden, fmt.Sprintf("origin %q is not allowed here (-origins)", origin[0]))
					return
				}
				h["Access-Control-Allow-Origin"] = origin[:1]
			}
		}
		h["Access-Control-Expose-Headers"] = hdrExposed
		if p := r.URL.Path; p != "/" && path.Clean(p) != strings.TrimSuffix(p, "/") {
			err := checkPath(p, s.cfg.maxKeyBytes)
			if err == nil { // not reached: a clean path is a valid one's only spelling
				err = fmt.Errorf("invalid path %s", quoteKey(p))
			}
			serveError(w, http.StatusBadRequest, err.Error())
			return
		}
		r.URL.RawPath = ""
		next.ServeHTTP(w, r)
	})
}
