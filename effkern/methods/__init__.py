"""Full flows for the efficiency methods of PAPERS.md, one subpackage per paper."""
