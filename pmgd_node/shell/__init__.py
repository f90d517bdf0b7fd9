"""The node's process shell: sockets, clocks, metrics and settings read at the edge.

Everything here is plumbing around the pure core one level up (pmgd_node.node and the modules
it uses), which holds what would sit in silicon and imports neither zmq nor this package.
"""
