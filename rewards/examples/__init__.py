"""Example user plugins: copy one next to your recipe and point a `rewards` entry at it."""
