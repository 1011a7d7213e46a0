// Messages as raw bytes: the codec that passes them through, and the few encoders.

package main

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// rawCodec passes bytes through: the streams encode and decode their own messages.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch b := v.(type) {
	case []byte:
		return b, nil
	case *[]byte:
		return *b, nil
	}
	return nil, fmt.Errorf("rawCodec: %T is not bytes", v)
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: %T is not *[]byte", v)
	}
	*p = data
	return nil
}

func (rawCodec) Name() string { return "proto" }

// fields walks the top-level fields of a message, calling f with each field's number,
// wire type and value (varint value, or the bytes of a length-delimited field).
func fields(b []byte, f func(num protowire.Number, typ protowire.Type, v uint64, sub []byte)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			f(num, typ, v, nil)
			b = b[m:]
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			f(num, typ, 0, v)
			b = b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			b = b[m:]
		}
	}
	return nil
}

func cpRequest(nodeID string, since int64, epoch string) []byte {
	var b []byte
	b = protowire.AppendTag(b, fWatchBundlesRequest_node_id, protowire.BytesType)
	b = protowire.AppendString(b, nodeID)
	if since != 0 {
		b = protowire.AppendTag(b, fWatchBundlesRequest_since_revision, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(since))
	}
	if epoch != "" {
		b = protowire.AppendTag(b, fWatchBundlesRequest_epoch, protowire.BytesType)
		b = protowire.AppendString(b, epoch)
	}
	return b
}

func etcdCreate(key []byte, startRevision int64) []byte {
	var c []byte
	c = protowire.AppendTag(c, fWatchCreateRequest_key, protowire.BytesType)
	c = protowire.AppendBytes(c, key)
	if startRevision > 0 {
		c = protowire.AppendTag(c, fWatchCreateRequest_start_revision, protowire.VarintType)
		c = protowire.AppendVarint(c, uint64(startRevision))
	}
	var b []byte
	b = protowire.AppendTag(b, fWatchRequest_create_request, protowire.BytesType)
	return protowire.AppendBytes(b, c)
}
