"""Text tools shared by the builders (builders/) and evaluation (eval/): haystacks, MuSiQue records, sub-EM scoring,
generation through the toolkit's engines."""
