print("realtime-sync")
