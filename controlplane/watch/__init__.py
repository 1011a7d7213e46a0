"""The watch: one hub per process that reads each revision once and routes it to the
streams whose keys it touches."""
