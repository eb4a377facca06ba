"""Code that stage kinds share. A kind imports these, never another kind."""
