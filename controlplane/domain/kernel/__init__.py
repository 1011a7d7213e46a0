"""What every rule uses: the error tree (each error knows its gRPC code), the clock,
secrets and ids, field checks and paging, labels and selectors, running in a thread."""
