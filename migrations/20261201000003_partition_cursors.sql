-- Where each partition stands in the router's stream of forwards (src/domain/forwarding.rs;
-- docs/ARCHITECTURE.md, "A refused forward"): the stamp of the last forward it applied. A
-- router draws its epoch from `router_epochs` each time it starts reading the ingress queue,
-- so a later epoch is larger. Written with each batch, in its transaction, and only forward.
CREATE SEQUENCE router_epochs;

CREATE TABLE partition_cursors (
    partition  INTEGER PRIMARY KEY CHECK (partition >= 0),
    epoch      BIGINT NOT NULL,
    seq        BIGINT NOT NULL CHECK (seq >= 0)
);
