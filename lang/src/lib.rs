//! The `.prune` language front end: grammar, AST, parser, formatter and static checks.
