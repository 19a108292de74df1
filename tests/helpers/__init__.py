"""What the tests share: tiny networks, constructed classifiers, entry-point runners, configs."""
