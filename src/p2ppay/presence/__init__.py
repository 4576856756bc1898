"""Who is online, and where: :mod:`.local` for one node, :mod:`.postgres` for the nodes that
share one PostgreSQL database."""
