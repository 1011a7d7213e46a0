// Envoy-like ADS streams (--proto ads-delta or ads-sotw): one bidirectional
// AggregatedDiscoveryService call per node, authenticated with the node's credential.
//
// A stream asks for clusters and listeners by wildcard and for the route configurations
// named by --ads-routes, acknowledges every response at once, and keeps what it holds
// (delta: each resource's version; state of the world: each type's version_info), so a
// resumed stream (a storm) says what it has, as Envoy does, and the server should send
// nothing again. A response's revision is the first part of its nonce
// (`<revision>-<type>-<content>`, controlplane/xds/session.py); the first response of a
// newer revision is that revision's receipt. A fresh stream is ready once it has a
// response of every type it asked for; a resumed one as soon as its requests are sent
// (the server owes it nothing: the benchmark sees the resume in the server's counters).

package main

import (
	"context"
	"errors"
	"io"
	"strconv"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	adsDeltaMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
	adsSotwMethod  = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
	typePrefix     = "type.googleapis.com/envoy.config."
	clusterURL     = typePrefix + "cluster.v3.Cluster"
	listenerURL    = typePrefix + "listener.v3.Listener"
	routeURL       = typePrefix + "route.v3.RouteConfiguration"
)

var adsDesc = &grpc.StreamDesc{StreamName: "ADS", ServerStreams: true, ClientStreams: true}

// The types a stream asks for, in Envoy's order (clusters, then listeners, then routes).
var adsTypes = []string{clusterURL, listenerURL, routeURL}

// adsHeld is what one stream holds, kept across its calls.
type adsHeld struct {
	delta map[string]map[string]string // type -> name -> version
	sotw  map[string]string            // type -> version_info
	got   map[string]bool              // types answered on the current call
}

func newHeld() *adsHeld {
	return &adsHeld{delta: map[string]map[string]string{}, sotw: map[string]string{}, got: map[string]bool{}}
}

func (w *worker) adsNames(url string) []string {
	if url == routeURL {
		return w.routes
	}
	return nil
}

// adsOpening is the first request of each type; with resume, what the stream holds.
func (w *worker) adsOpening(s *stream, resume bool) [][]byte {
	var out [][]byte
	for i, url := range adsTypes {
		var b []byte
		if i == 0 {
			var node []byte
			node = protowire.AppendTag(node, fNode_id, protowire.BytesType)
			node = protowire.AppendString(node, s.nodeID)
			if w.proto == "ads-delta" {
				b = protowire.AppendTag(b, fDeltaDiscoveryRequest_node, protowire.BytesType)
			} else {
				b = protowire.AppendTag(b, fDiscoveryRequest_node, protowire.BytesType)
			}
			b = protowire.AppendBytes(b, node)
		}
		if w.proto == "ads-delta" {
			b = protowire.AppendTag(b, fDeltaDiscoveryRequest_type_url, protowire.BytesType)
			b = protowire.AppendString(b, url)
			for _, n := range w.adsNames(url) {
				b = protowire.AppendTag(b, fDeltaDiscoveryRequest_resource_names_subscribe, protowire.BytesType)
				b = protowire.AppendString(b, n)
			}
			if resume {
				for name, version := range s.held.delta[url] {
					var e []byte
					e = protowire.AppendTag(e, 1, protowire.BytesType) // map entry key
					e = protowire.AppendString(e, name)
					e = protowire.AppendTag(e, 2, protowire.BytesType) // map entry value
					e = protowire.AppendString(e, version)
					b = protowire.AppendTag(b, fDeltaDiscoveryRequest_initial_resource_versions, protowire.BytesType)
					b = protowire.AppendBytes(b, e)
				}
			}
		} else {
			b = append(b, sotwRequest(url, w.adsNames(url), resumeVersion(s, url, resume), "")...)
		}
		out = append(out, b)
	}
	return out
}

func resumeVersion(s *stream, url string, resume bool) string {
	if !resume {
		return ""
	}
	return s.held.sotw[url]
}

func sotwRequest(url string, names []string, version, nonce string) []byte {
	var b []byte
	if version != "" {
		b = protowire.AppendTag(b, fDiscoveryRequest_version_info, protowire.BytesType)
		b = protowire.AppendString(b, version)
	}
	for _, n := range names {
		b = protowire.AppendTag(b, fDiscoveryRequest_resource_names, protowire.BytesType)
		b = protowire.AppendString(b, n)
	}
	b = protowire.AppendTag(b, fDiscoveryRequest_type_url, protowire.BytesType)
	b = protowire.AppendString(b, url)
	if nonce != "" {
		b = protowire.AppendTag(b, fDiscoveryRequest_response_nonce, protowire.BytesType)
		b = protowire.AppendString(b, nonce)
	}
	return b
}

func deltaAck(url, nonce string) []byte {
	var b []byte
	b = protowire.AppendTag(b, fDeltaDiscoveryRequest_type_url, protowire.BytesType)
	b = protowire.AppendString(b, url)
	b = protowire.AppendTag(b, fDeltaDiscoveryRequest_response_nonce, protowire.BytesType)
	return protowire.AppendString(b, nonce)
}

// onADS handles one response: it updates what the stream holds, records the receipt of
// a newer revision, and returns the acknowledgement to send.
func (w *worker) onADS(s *stream, msg []byte, t float64) ([]byte, error) {
	var url, nonce, version string
	type res struct{ name, version string }
	var updates []res
	var removed []string
	count := 0
	delta := w.proto == "ads-delta"
	err := fields(msg, func(num protowire.Number, _ protowire.Type, _ uint64, sub []byte) {
		if delta {
			switch num {
			case fDeltaDiscoveryResponse_type_url:
				url = string(sub)
			case fDeltaDiscoveryResponse_nonce:
				nonce = string(sub)
			case fDeltaDiscoveryResponse_removed_resources:
				removed = append(removed, string(sub))
			case fDeltaDiscoveryResponse_resources:
				var r res
				_ = fields(sub, func(f protowire.Number, _ protowire.Type, _ uint64, v []byte) {
					switch f {
					case fResource_name:
						r.name = string(v)
					case fResource_version:
						r.version = string(v)
					}
				})
				updates = append(updates, r)
				count++
			}
			return
		}
		switch num {
		case fDiscoveryResponse_type_url:
			url = string(sub)
		case fDiscoveryResponse_nonce:
			nonce = string(sub)
		case fDiscoveryResponse_version_info:
			version = string(sub)
		case fDiscoveryResponse_resources:
			count++
		}
	})
	if err != nil {
		return nil, err
	}
	rev, _ := strconv.ParseInt(strings.SplitN(nonce, "-", 2)[0], 10, 64)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.messages++
	w.events += count
	if delta {
		held := s.held.delta[url]
		if held == nil {
			held = map[string]string{}
			s.held.delta[url] = held
		}
		for _, r := range updates {
			held[r.name] = r.version
		}
		for _, n := range removed {
			delete(held, n)
		}
	} else {
		s.held.sotw[url] = version
	}
	if rev > s.cursor {
		s.cursor = rev
		w.receipt(rev, t)
	}
	if !s.held.got[url] {
		s.held.got[url] = true
		if !s.ready && len(s.held.got) >= len(adsTypes) {
			s.tStarted = t
			s.mode = "ADS"
			w.markReady(s, t)
		}
	}
	if delta {
		return deltaAck(url, nonce), nil
	}
	return sotwRequest(url, w.adsNames(url), version, nonce), nil
}

// onceADS runs one ADS call of stream s (see once).
func (w *worker) onceADS(ctx context.Context, s *stream, conn *grpc.ClientConn, resume bool, fail func(error) (bool, bool, string)) (bool, bool, string) {
	method := adsSotwMethod
	if w.proto == "ads-delta" {
		method = adsDeltaMethod
	}
	w.mu.Lock()
	if s.held == nil {
		s.held = newHeld()
	}
	s.held.got = map[string]bool{}
	opening := w.adsOpening(s, resume)
	w.mu.Unlock()
	cs, err := conn.NewStream(ctx, adsDesc, method)
	if err != nil {
		return fail(err)
	}
	for _, m := range opening {
		if err := cs.SendMsg(m); err != nil {
			return fail(err)
		}
	}
	if resume {
		w.mu.Lock()
		if !s.ready {
			s.tStarted = now()
			s.mode = "ADS_RESUMED"
			w.markReady(s, s.tStarted)
		}
		w.mu.Unlock()
	}
	gotAny := false
	for {
		var b []byte
		if err := cs.RecvMsg(&b); err != nil {
			if errors.Is(err, io.EOF) {
				return gotAny, false, "OK"
			}
			if gotAny {
				name, _ := codeOf(err)
				return true, false, name
			}
			return fail(err)
		}
		gotAny = true
		ack, err := w.onADS(s, b, now())
		if err != nil {
			return gotAny, false, "BAD_MESSAGE"
		}
		if err := cs.SendMsg(ack); err != nil {
			name, _ := codeOf(err)
			return gotAny, false, name
		}
	}
}
