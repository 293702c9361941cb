// TypeScript declarations of the AtomKV browser client (client.js, served
// at GET / of an AtomKV server). A page loads the script with
// <script src="http://host:port/"></script>, which defines the global
// AtomKV; a TypeScript page references this file:
//
//     /// <reference path="client.d.ts" />
//     const [value, revision] = await AtomKV.get('/room/42');

/** Any JSON value: what a key holds. */
type AtomKVValue = null | boolean | number | string | AtomKVValue[] | {[member: string]: AtomKVValue};

/** A change of a key: [key, value, revision]; a delete or expiry is [key, null, -1]. */
type AtomKVEvent<T = AtomKVValue> = [key: string, value: T | null, revision: number];

/** One key of a listing. ttl: milliseconds left, only if the key has a TTL. */
interface AtomKVItem<T = AtomKVValue> {
    key: string;
    value: T;
    revision: number;
    ttl?: number;
}

/** A TTL: milliseconds, or a string such as '500ms', '90 sec', '1h30m', '2 weeks'. */
type AtomKVTTL = number | string;

/** How the client reaches the server (AtomKV.transport). */
type AtomKVTransport = 'auto' | 'websocket' | 'http';

/** The state of the page's connection (AtomKV.onstatus). */
type AtomKVStatus = 'connecting' | 'open' | 'closed';

/**
 * The error a write (set, update, delete) rejects with when the
 * connection dropped after it was sent and before its answer came: it may
 * or may not have been applied, and it is not sent again by itself.
 * Its name is 'OutcomeUnknownError'; its message says "outcome unknown".
 */
interface AtomKVOutcomeUnknownError extends Error {
    name: 'OutcomeUnknownError';
}

interface AtomKVClient {
    /** The server, an origin such as 'http://localhost:8000'; by default the one the script came from. */
    BASE: string;
    /** A token of the server's -tokens file, sent with every request and on the socket; '' for none. */
    token: string;
    /**
     * 'auto' (the default): one WebSocket per page, and EventSource and
     * fetch if two handshakes fail before any succeeded; 'websocket':
     * never fall back; 'http': EventSource and fetch only.
     */
    transport: AtomKVTransport;
    /**
     * Called on every change of the connection's state, with the
     * transport in use or being tried; with 'http' (the fallback), 'open'
     * once, as EventSource and fetch need no connection of their own.
     */
    onstatus: ((status: AtomKVStatus, transport: 'websocket' | 'http') => void) | null;

    /** [value, revision], or [null, -1] if the key is missing. */
    get<T = AtomKVValue>(key: string): Promise<[value: T | null, revision: number]>;
    /** Sets the key unconditionally; resolves with its new revision. */
    set(key: string, value: AtomKVValue, options?: {ttl?: AtomKVTTL}): Promise<number>;
    /**
     * Compare-and-swap: true if the key now has revision (one more than
     * the revision last seen; 0 creates), false if another write came
     * first.
     */
    update(key: string, value: AtomKVValue, revision: number, options?: {ttl?: AtomKVTTL}): Promise<boolean>;
    /** true; false if a revision was given and the key is not at it. */
    delete(key: string, options?: {revision?: number}): Promise<boolean>;
    /** Every key under prefix ('/' for all), sorted by key. */
    list<T = AtomKVValue>(prefix: string): Promise<AtomKVItem<T>[]>;
    /**
     * Every change of a key, of every key under a prefix ending with '/',
     * or of every key ('/'); with {initial: true}, the current state
     * first. Survives reconnects; leaving the loop ends the subscription.
     */
    subscribe<T = AtomKVValue>(path: string, options?: {initial?: boolean}): AsyncGenerator<AtomKVEvent<T>, void, undefined>;
}

declare const AtomKV: AtomKVClient;
