"""Docker Swarm deployment helpers: macvlan address plans for render nodes."""
