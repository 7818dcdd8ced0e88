"""Tools (private): summary tables, and later sensitivity and allocation. May import every layer;
nothing imports them but ``jaxqp`` itself. The public names are re-exported by ``jaxqp``."""
